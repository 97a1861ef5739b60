//! Blocking work that async code must do in line (a flush that must finish before a reply, a
//! write that holds a reader back on purpose): on a multi-threaded runtime the worker hands
//! its other tasks to the rest while it blocks; elsewhere (tests on one thread, plain threads)
//! it just runs.

/// Runs `f`, letting the runtime move this worker's other tasks elsewhere while it blocks.
pub fn in_place<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn runs_on_any_thread_or_runtime() {
        assert_eq!(super::in_place(|| 1), 1);
        let one = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(one.block_on(async { super::in_place(|| 2) }), 2);
        let many = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        assert_eq!(many.block_on(async { super::in_place(|| 3) }), 3);
    }
}

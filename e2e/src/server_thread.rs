//! A loopback server on its own thread and tokio runtime, for harness parts that synchronous
//! tests drive. Stopping it (or dropping it) ends its accept loop, and dropping the runtime
//! with the thread cancels every connection still open, stalled ones included.

use std::future::Future;
use std::thread::JoinHandle;

use anyhow::Result;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub struct ServerThread {
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ServerThread {
    /// Runs `serve(listener, stopped)` on `runtime` in a thread named `name`; `stopped`
    /// resolves when the server is asked to stop. `listener` must be non-blocking.
    pub fn spawn<F, Fut>(
        name: &str,
        runtime: tokio::runtime::Runtime,
        listener: std::net::TcpListener,
        serve: F,
    ) -> Result<Self>
    where
        F: FnOnce(TcpListener, oneshot::Receiver<()>) -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let (shutdown, stopped) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(listener) else {
                        return;
                    };
                    serve(listener, stopped).await;
                });
            })?;
        Ok(Self {
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    pub fn stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        self.stop();
    }
}

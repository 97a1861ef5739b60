//! Fuzz targets for the reader side of the lazy layer format, and what every fuzz crate of
//! the workspace shares: the `fuzz_main!` driver and the seed layers.
//!
//! A target is a plain `fn(&[u8])` (in `targets`) that must return for any input: no panic,
//! no abort, no hang and no allocation sized by unchecked input. The binaries in
//! `fuzz_targets/` only wrap one target each with `fuzz_main!`, so the same code runs under
//! libFuzzer, AFL++ or a plain replay. This crate is outside the workspace (it has its own
//! lock file) so the workspace build never sees a fuzzer.

pub mod seeds;
pub mod targets;

use std::io::Read;
use std::path::Path;

/// The `main` of a fuzz binary: libFuzzer's entry point with the `libfuzzer` feature, AFL++'s
/// persistent loop with `afl`, and with neither a replay of the files and directories named
/// on the command line (stdin when none is). The binary must start with
/// `#![cfg_attr(feature = "libfuzzer", no_main)]` and have the `libfuzzer-sys` and `afl`
/// crates as the optional dependencies of those features.
#[macro_export]
macro_rules! fuzz_main {
    ($target:path) => {
        #[cfg(all(feature = "libfuzzer", feature = "afl"))]
        compile_error!("choose one of the features `libfuzzer` and `afl`");

        #[cfg(feature = "libfuzzer")]
        libfuzzer_sys::fuzz_target!(|data: &[u8]| $target(data));

        #[cfg(all(feature = "afl", not(feature = "libfuzzer")))]
        fn main() {
            afl::fuzz!(|data: &[u8]| $target(data));
        }

        #[cfg(not(any(feature = "libfuzzer", feature = "afl")))]
        fn main() {
            $crate::replay($target);
        }
    };
}

/// Runs `target` on every file named in the arguments (directories are read one level deep,
/// in name order), or on stdin when there are none, and prints how many inputs ran. A crash
/// shows up as the panic of the input being run, named on the line before it.
pub fn replay(target: fn(&[u8])) {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    if args.is_empty() {
        let mut data = Vec::new();
        std::io::stdin()
            .read_to_end(&mut data)
            .expect("reading stdin");
        target(&data);
        println!("1 input ran");
        return;
    }
    let mut ran = 0;
    for arg in args {
        for file in inputs(Path::new(&arg)) {
            eprintln!("running {}", file.display());
            let data = std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            target(&data);
            ran += 1;
        }
    }
    println!("{ran} inputs ran");
}

/// `path` itself, or the files directly inside it, in name order.
pub fn inputs(path: &Path) -> Vec<std::path::PathBuf> {
    if !path.is_dir() {
        return vec![path.to_owned()];
    }
    let mut files: Vec<_> = std::fs::read_dir(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::seeds::{self, check_dir};
    use super::targets;

    fn seed_dir(target: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("seeds")
            .join(target)
    }

    #[test]
    fn seeds_are_current() {
        let layers = seeds::layers();
        let files = |ext: &str, f: &dyn Fn(&seeds::Seed) -> Vec<u8>| -> Vec<(String, Vec<u8>)> {
            layers
                .iter()
                .map(|s| (format!("{}.{ext}", s.name), f(s)))
                .collect()
        };
        check_dir(&seed_dir("toc"), &files("blob", &|s| s.blob.clone()));
        check_dir(&seed_dir("toc_json"), &files("json", &|s| s.json.clone()));
        check_dir(
            &seed_dir("annotations"),
            &files("txt", &|s| s.annotations.clone().into_bytes()),
        );
    }

    /// Every committed seed (and every crash input added there since) runs through its target.
    #[test]
    fn seeds_run_clean() {
        for (target, run) in [
            ("toc", targets::toc as fn(&[u8])),
            ("toc_json", targets::toc_json),
            ("annotations", targets::annotations),
        ] {
            let inputs = super::inputs(&seed_dir(target));
            assert!(!inputs.is_empty(), "no seeds for {target}");
            for path in inputs {
                run(&std::fs::read(&path).unwrap());
            }
        }
    }
}

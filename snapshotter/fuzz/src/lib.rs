//! Fuzz targets for the FUSE filesystem of one layer: the inode table built from a TOC, and
//! every metadata call and read plan the callbacks make on it
//! (`brisk_snapshotter::fs::fuzz::fuzz_layer`). The driver and the seed layers are shared with
//! `blobcache/fuzz`. Outside the workspace, like it.

pub mod generate;

use brisk_blobcache::toc::Toc;
use brisk_snapshotter::fs::fuzz::fuzz_layer;

/// A layer generated from the bytes (`generate`), so most inputs reach the table builder.
pub fn inode(data: &[u8]) {
    let mut u = arbitrary::Unstructured::new(data);
    if let Ok(layer) = generate::layer(&mut u) {
        fuzz_layer(&layer.toc, layer.tar.as_deref());
    }
}

/// The TOC's JSON as the converter writes it, for mutating real TOCs.
pub fn inode_json(data: &[u8]) {
    if let Ok(toc) = serde_json::from_slice::<Toc>(data) {
        fuzz_layer(&toc, None);
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use brisk_blobcache_fuzz::seeds::{self, check_dir};

    fn seed_dir(target: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("seeds")
            .join(target)
    }

    /// The JSON seeds are the sample layers' TOCs; the generator's seeds are only bytes for
    /// it to start from (any bytes make a layer), from a fixed xorshift.
    #[test]
    fn seeds_are_current() {
        let json: Vec<_> = seeds::layers()
            .into_iter()
            .map(|s| (format!("{}.json", s.name), s.json))
            .collect();
        check_dir(&seed_dir("inode_json"), &json);
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let bytes: Vec<_> = [64, 512, 4096]
            .into_iter()
            .map(|len| {
                let data: Vec<u8> = (0..len)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        state as u8
                    })
                    .collect();
                (format!("xorshift-{len}"), data)
            })
            .collect();
        check_dir(&seed_dir("inode"), &bytes);
    }

    #[test]
    fn seeds_run_clean() {
        for (target, run) in [
            ("inode", super::inode as fn(&[u8])),
            ("inode_json", super::inode_json),
        ] {
            let inputs = brisk_blobcache_fuzz::inputs(&seed_dir(target));
            assert!(!inputs.is_empty(), "no seeds for {target}");
            for path in inputs {
                run(&std::fs::read(&path).unwrap());
            }
        }
    }
}

//! Round trip through the standard tools: a generated layer with every kind of entry, converted
//! to the lazy format, unpacks with `zstd -d | tar -x` to exactly the tree the original tar
//! unpacks to (content, modes, owners, links, device numbers, xattrs).
//!
//! Needs root (owners, device nodes) and the `zstd`, `tar`, `getfattr` commands. Without
//! `BRISK_E2E=1` a missing prerequisite skips the test visibly; with it, the test fails.

use std::path::Path;
use std::process::Command;

use brisk_blobcache::toc::{convert_layer, ConvertOptions};

fn prerequisites() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc_geteuid() } != 0 {
        return Err("needs root".into());
    }
    for tool in ["zstd", "tar", "getfattr", "sha256sum", "find"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map_or(true, |o| !o.status.success())
        {
            return Err(format!("needs the `{tool}` command"));
        }
    }
    Ok(())
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn gate() -> bool {
    match prerequisites() {
        Ok(()) => true,
        Err(why) if std::env::var("BRISK_E2E").as_deref() == Ok("1") => {
            panic!("BRISK_E2E=1 but {why}")
        }
        Err(why) => {
            println!("skipped: {why} (set BRISK_E2E=1 to require it)");
            false
        }
    }
}

fn header(kind: tar::EntryType, size: u64, mode: u32, uid: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(uid + 1);
    h.set_mtime(1_650_000_000 + uid);
    h
}

/// A layer exercising every entry kind the format records.
fn every_kind_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let dir = |b: &mut tar::Builder<Vec<u8>>, name: &str, mode: u32| {
        b.append_data(
            &mut header(tar::EntryType::Directory, 0, mode, 0),
            name,
            std::io::empty(),
        )
        .unwrap();
    };
    let file = |b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8], mode: u32, uid: u64| {
        b.append_data(
            &mut header(tar::EntryType::Regular, data.len() as u64, mode, uid),
            name,
            data,
        )
        .unwrap();
    };
    dir(&mut b, "./", 0o755);
    dir(&mut b, "etc/", 0o755);
    dir(&mut b, "usr/", 0o755);
    dir(&mut b, "usr/bin/", 0o755);
    dir(&mut b, "tmp/", 0o1777);
    dir(&mut b, "opt/", 0o700);
    dir(&mut b, "opt/app/", 0o750);
    file(&mut b, "etc/hostname", b"brisk\n", 0o644, 0);
    file(&mut b, "etc/shadow", b"root:*:19000::::::\n", 0o600, 0);
    file(&mut b, "etc/empty", b"", 0o644, 42);
    file(
        &mut b,
        "usr/bin/tool",
        &[0x7f, b'E', b'L', b'F', 2, 1, 1],
        0o4755,
        0,
    );
    // Mostly zeros with a little data: large, sparse-ish, compresses to almost nothing.
    let mut sparse = vec![0u8; 5 * 1024 * 1024 + 123];
    sparse[3 * 1024 * 1024..3 * 1024 * 1024 + 8].copy_from_slice(b"brisk!!!");
    file(&mut b, "opt/app/sparse.img", &sparse, 0o640, 1000);
    let noisy: Vec<u8> = (0..2_500_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    file(&mut b, "opt/app/data.bin", &noisy, 0o644, 1000);
    file(
        &mut b,
        "opt/app/ünïcödé 名前.txt",
        "grüße\n".as_bytes(),
        0o644,
        1000,
    );
    let mut h = header(tar::EntryType::Symlink, 0, 0o777, 0);
    b.append_link(&mut h, "opt/app/abs-link", "/opt/app/data.bin")
        .unwrap();
    let mut h = header(tar::EntryType::Symlink, 0, 0o777, 0);
    b.append_link(&mut h, "usr/bin/rel-link", "tool").unwrap();
    let mut h = header(tar::EntryType::Link, 0, 0o644, 0);
    b.append_link(&mut h, "etc/hostname.hard", "etc/hostname")
        .unwrap();
    let mut h = header(tar::EntryType::Char, 0, 0o666, 0);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    b.append_data(&mut h, "etc/null", std::io::empty()).unwrap();
    let mut h = header(tar::EntryType::Fifo, 0, 0o644, 0);
    b.append_data(&mut h, "tmp/fifo", std::io::empty()).unwrap();
    b.append_pax_extensions([("SCHILY.xattr.user.brisk", b"hello".as_slice())])
        .unwrap();
    file(&mut b, "etc/with-xattr", b"x", 0o644, 0);
    // Whiteout and opaque markers are ordinary (empty) files to tar.
    file(&mut b, "etc/.wh.motd", b"", 0o644, 0);
    file(&mut b, "opt/app/.wh..wh..opq", b"", 0o644, 0);
    b.into_inner().unwrap()
}

fn run(script: &str, dir: &Path) -> String {
    let out = Command::new("bash")
        .args(["-c", script])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Everything about a tree that unpacking must preserve, as sorted text.
fn describe(root: &Path) -> String {
    run(
        // Directory mtimes are left out: tar sets them, then later entries touch them again.
        "{ find . -mindepth 1 -type d -printf '%p %y %m %U %G\\n'; \
           find . -mindepth 1 ! -type d -printf '%p %y %m %U %G %s %l %n %T@\\n'; } | LC_ALL=C sort; \
         find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum; \
         find . -type c -printf '%p ' -exec stat -c '%t:%T' {} \\; | LC_ALL=C sort; \
         getfattr -R -h -d -m - . 2>/dev/null | grep -v '^$' || true",
        root,
    )
}

#[test]
fn zstd_and_tar_unpack_a_converted_layer_to_the_identical_tree() {
    if !gate() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let tar = every_kind_tar();
    let (_, blob) = convert_layer(
        &tar[..],
        Vec::new(),
        &ConvertOptions {
            chunk_size: 256 * 1024,
            ..ConvertOptions::default()
        },
    )
    .unwrap();
    std::fs::write(work.path().join("layer.tar"), &tar).unwrap();
    std::fs::write(work.path().join("layer.tar.zst"), &blob).unwrap();
    let flags = "--numeric-owner --same-owner --xattrs --xattrs-include='*' -xpf";
    run(
        &format!("mkdir original converted && tar -C original {flags} layer.tar"),
        work.path(),
    );
    run(
        &format!("zstd -dc layer.tar.zst | tar -C converted {flags} -"),
        work.path(),
    );

    let (original, converted) = (
        describe(&work.path().join("original")),
        describe(&work.path().join("converted")),
    );
    assert_eq!(original, converted);
    // The comparison saw what it claims to compare.
    for needle in [
        "./etc/null c 666",
        "user.brisk=\"hello\"",
        "./opt/app/abs-link l 777 0 1 17 /opt/app/data.bin",
        "4755",
        "ünïcödé",
        ".wh..wh..opq",
    ] {
        assert!(
            converted.contains(needle),
            "{needle} missing from:\n{converted}"
        );
    }
    assert!(
        converted.contains("./etc/hostname f 644 0 1 6  2 1650000000"),
        "hardlink count missing:\n{converted}"
    );
}

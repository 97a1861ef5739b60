//! containerd itself as the client of Brisk's snapshots API: the same `ctr snapshots`
//! commands, run in one containerd against its own overlayfs snapshotter and against Brisk,
//! give the same answers, errors and their words included (containerd 1.6 passes these
//! through from the snapshotter: a parent that is not committed, a commit of a view, the
//! mounts of a committed snapshot), and the same usage, kinds, parents, labels, mounts and
//! directory owners.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use brisk_e2e::cmd::run_output;
use brisk_e2e::daemons::{Containerd, Snapshotter};
use brisk_e2e::{gate, CONTAINERD_TOOLS};

/// One snapshotter's answers to the script, as text with its roots replaced by `<root>`.
struct Transcript {
    text: String,
    roots: Vec<String>,
}

impl Transcript {
    fn note(&mut self, line: &str) {
        let mut line = mask_times(line);
        for r in &self.roots {
            line = line.replace(r.as_str(), "<root>");
        }
        self.text.push_str(&line);
        self.text.push('\n');
    }
}

/// Replaces the seconds-precision times `ctr` puts in `containerd.io/gc.root` labels.
fn mask_times(text: &str) -> String {
    let shape = "dddd-dd-ddTdd:dd:ddZ";
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        let fits = b.len() - i >= shape.len()
            && shape.bytes().zip(&b[i..]).all(|(s, &c)| match s {
                b'd' => c.is_ascii_digit(),
                s => s == c,
            });
        if fits {
            out.push_str("<time>");
            i += shape.len();
        } else {
            let c = text[i..].chars().next().expect("in bounds");
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// `ctr snapshots --snapshotter NAME ARGS`: its exit status and output, noted; its stdout.
fn ctr(c: &Containerd, name: &str, t: &mut Transcript, args: &[&str]) -> Result<String> {
    let out = run_output(
        Command::new("ctr")
            .arg("-a")
            .arg(&c.socket)
            .arg("-n")
            .arg(&c.namespace)
            .args(["snapshots", "--snapshotter", name])
            .args(args),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    // The times are containerd's own (its metadata store), different on every run.
    let kept: Vec<String> = stdout
        .lines()
        .filter(|l| !l.contains("\"Created\"") && !l.contains("\"Updated\""))
        .map(|l| match args.first() {
            // `ctr snapshots label` prints a Go map: its order differs from run to run.
            Some(&"label") => {
                let mut labels: Vec<&str> = l.split(',').collect();
                labels.sort_unstable();
                labels.join(",")
            }
            _ => l.to_owned(),
        })
        .collect();
    t.note(&format!(
        "$ {}\n{}\n{}{}",
        args.join(" "),
        if out.status.success() { "ok" } else { "failed" },
        kept.join("\n"),
        String::from_utf8_lossy(&out.stderr).trim_end()
    ));
    Ok(stdout)
}

/// The source of a one-mount `mount -t bind SRC TARGET -o ...` line of `ctr snapshots mounts`.
fn bind_source(mounts: &str) -> Result<String> {
    let words: Vec<&str> = mounts.split_whitespace().collect();
    anyhow::ensure!(words.get(2) == Some(&"bind"), "not a bind mount: {mounts}");
    Ok(words.get(3).context("no source")?.to_string())
}

fn upperdir(mounts: &str) -> Result<String> {
    mounts
        .split([',', ' ', '\n', '"'])
        .find_map(|o| o.strip_prefix("upperdir="))
        .map(str::to_owned)
        .with_context(|| format!("no upperdir in {mounts}"))
}

fn owner(t: &mut Transcript, what: &str, path: &str) -> Result<()> {
    let m = std::fs::metadata(path).with_context(|| path.to_owned())?;
    t.note(&format!("owner of {what}: {}:{}", m.uid(), m.gid()));
    Ok(())
}

/// The script: one path through every call `ctr` makes of a snapshotter.
fn script(c: &Containerd, name: &str, roots: Vec<String>, scratch: &Path) -> Result<String> {
    let mut t = Transcript {
        text: String::new(),
        roots,
    };
    // One target for both: `mounts` prints it.
    let target = scratch.join("target");
    std::fs::create_dir_all(&target)?;
    let target = target.to_str().context("non-UTF-8 path")?;
    ctr(c, name, &mut t, &["prepare", "a"])?;
    ctr(c, name, &mut t, &["usage", "a"])?;
    let fs = bind_source(&ctr(c, name, &mut t, &["mounts", target, "a"])?)?;
    std::fs::create_dir(Path::new(&fs).join("dir"))?;
    std::fs::write(Path::new(&fs).join("dir/file"), vec![1u8; 100_000])?;
    std::os::unix::fs::chown(&fs, Some(1000), Some(1001))?;
    ctr(c, name, &mut t, &["usage", "a"])?;
    ctr(c, name, &mut t, &["prepare", "b", "a"])?;
    ctr(c, name, &mut t, &["view", "b", "a"])?;
    ctr(c, name, &mut t, &["commit", "c", "a"])?;
    ctr(c, name, &mut t, &["usage", "c"])?;
    ctr(c, name, &mut t, &["info", "c"])?;
    ctr(c, name, &mut t, &["mounts", target, "c"])?;
    ctr(c, name, &mut t, &["view", "v", "c"])?;
    // `ctr snapshots view` sets no GC root: without one, containerd's collector may remove
    // the view at any time during the script.
    ctr(
        c,
        name,
        &mut t,
        &["label", "v", "containerd.io/gc.root=kept"],
    )?;
    ctr(c, name, &mut t, &["usage", "v"])?;
    ctr(c, name, &mut t, &["mounts", target, "v"])?;
    ctr(c, name, &mut t, &["commit", "x", "v"])?;
    let upper = upperdir(&ctr(c, name, &mut t, &["prepare", "--mounts", "d", "c"])?)?;
    owner(&mut t, "d's upper directory", &upper)?;
    ctr(c, name, &mut t, &["commit", "e", "d"])?;
    ctr(c, name, &mut t, &["view", "w", "e"])?;
    ctr(
        c,
        name,
        &mut t,
        &["label", "w", "containerd.io/gc.root=kept"],
    )?;
    ctr(c, name, &mut t, &["mounts", target, "w"])?;
    ctr(
        c,
        name,
        &mut t,
        &["label", "e", "containerd.io/snapshot/x=1"],
    )?;
    ctr(c, name, &mut t, &["info", "e"])?;
    ctr(
        c,
        name,
        &mut t,
        &["label", "e", "containerd.io/snapshot/x="],
    )?;
    ctr(c, name, &mut t, &["info", "e"])?;
    ctr(c, name, &mut t, &["ls"])?;
    ctr(c, name, &mut t, &["rm", "c"])?;
    for key in ["w", "v", "e", "c"] {
        ctr(c, name, &mut t, &["rm", key])?;
    }
    ctr(c, name, &mut t, &["ls"])?;
    Ok(t.text)
}

#[test]
fn ctr_snapshots_answers_as_with_containerds_overlayfs() -> Result<()> {
    if !gate(CONTAINERD_TOOLS, &[]) {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let brisk = Snapshotter::start(&tmp.path().join("brisk"), &[])?;
    let containerd = Containerd::start(
        &tmp.path().join("containerd"),
        &brisk.socket,
        &format!("semantics-{}", std::process::id()),
    )?;
    let overlay_root = tmp
        .path()
        .join("containerd/root/io.containerd.snapshotter.v1.overlayfs");
    let scratch = tmp.path().join("targets");
    let expected = script(
        &containerd,
        "overlayfs",
        vec![overlay_root.display().to_string()],
        &scratch,
    )?;
    let got = script(
        &containerd,
        "brisk",
        vec![brisk.root.display().to_string()],
        &scratch,
    )
    .with_context(|| format!("snapshotter log:\n{}", brisk.log()))?;
    // The script must have reached the snapshotter's own refusals, or it tests nothing.
    for needle in [
        "is not committed snapshot",
        "is not active",
        "not active or view",
    ] {
        assert!(
            expected.contains(needle),
            "{needle} not reached:\n{expected}"
        );
    }
    assert_eq!(
        got, expected,
        "brisk (left) and overlayfs (right) differ:\n--- brisk\n{got}\n--- overlayfs\n{expected}"
    );
    Ok(())
}

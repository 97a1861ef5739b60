//! The pieces every measurement is made of: fresh daemons in a scratch directory, a dropped
//! page cache, `brisk pull`, and commands watched until they print a given line or time out.
//!
//! Nothing here measures anything by itself; it only makes each run start from a known state
//! and hands back the instants the callers time.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::brisk_bin;
use crate::cmd::{command_line, run};
use crate::daemons::{Containerd, Snapshotter};

/// Longest a single step (a pull, a container run) may take before it counts as failed.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(600);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A name no other run of this process (or another process sharing `/run/containerd`) uses.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

/// Writes dirty pages back and empties the page, dentry and inode caches, so that a run reads
/// from disk (or through FUSE) whatever an earlier run left in memory.
pub fn drop_caches() -> Result<()> {
    run(&mut Command::new("sync"))?;
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").context("Dropping the page cache")
}

/// A snapshotter config with start-up traces off: neither recorded nor replayed, so a read is
/// served by the cache levels alone.
pub fn write_no_trace_config(path: &Path) -> Result<()> {
    std::fs::write(
        path,
        "[trace]\nrecord = false\nprefetch = false\nfetch_from_registry = false\n",
    )?;
    Ok(())
}

/// `ctr -a SOCK -n NS ARGS` for `containerd`, not yet run.
pub fn ctr(containerd: &Containerd, args: &[&str]) -> Command {
    ctr_like("ctr", containerd, args)
}

/// `PROGRAM -a SOCK -n NS ARGS`, for `ctr` and the clients built on it (`ctr-remote`).
pub fn ctr_like(program: &str, containerd: &Containerd, args: &[&str]) -> Command {
    let mut cmd = Command::new(program);
    cmd.arg("-a")
        .arg(&containerd.socket)
        .arg("-n")
        .arg(&containerd.namespace)
        .args(args);
    cmd
}

/// `brisk pull IMAGE` into `containerd` through the Brisk snapshotter; its `--json` summary.
pub fn brisk_pull(containerd: &Containerd, image: &str) -> Result<Value> {
    let mut cmd = Command::new(brisk_bin()?);
    cmd.args(["pull", image, "--json", "--containerd"])
        .arg(&containerd.socket)
        .args(["--namespace", &containerd.namespace]);
    let out = watch(&mut cmd, None, STEP_TIMEOUT)?;
    serde_json::from_str(&out.stdout).context("Parsing the `brisk pull --json` summary")
}

/// `brisk status --json` of the daemon on `socket`: cache hits per level, registry traffic.
pub fn brisk_status(socket: &Path) -> Result<Value> {
    let out = run(Command::new(brisk_bin()?)
        .args(["status", "--json", "--snapshotter"])
        .arg(socket))?;
    serde_json::from_str(&out).context("Parsing `brisk status --json`")
}

/// What a watched command did.
pub struct Watched {
    /// When the awaited line appeared on stdout, if one was awaited.
    pub line_at: Option<Instant>,
    pub stdout: String,
}

/// Runs `cmd` to completion, noting when a stdout line equal to `line` first appears. Fails if
/// the command fails, if the line never appears, or if it takes longer than `timeout` (the
/// command is then killed, by its pid).
pub fn watch(cmd: &mut Command, line: Option<&str>, timeout: Duration) -> Result<Watched> {
    match line {
        Some(line) => watch_for(cmd, Some(&|l: &str| l == line), timeout),
        None => watch_for(cmd, None, timeout),
    }
}

/// `watch`, awaiting the first stdout line (trailing blanks trimmed) that `awaited` accepts.
pub fn watch_for(
    cmd: &mut Command,
    awaited: Option<&dyn Fn(&str) -> bool>,
    timeout: Duration,
) -> Result<Watched> {
    let what = command_line(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("Starting `{what}`"))?;
    let (lines_tx, lines) = mpsc::channel::<(Instant, String)>();
    let stdout = child.stdout.take().context("stdout")?;
    let mut stderr = child.stderr.take().context("stderr")?;
    let reader = std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines() {
            let Ok(l) = l else { break };
            if lines_tx.send((Instant::now(), l)).is_err() {
                break;
            }
        }
    });
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + timeout;
    let mut line_at = None;
    let mut out = String::new();
    let mut timed_out = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok((at, l)) => {
                if line_at.is_none() && awaited.is_some_and(|f| f(l.trim_end())) {
                    line_at = Some(at);
                }
                out.push_str(&l);
                out.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                // Only this child, by its pid; the pipes then close and the readers end.
                let _ = child.kill();
                break;
            }
        }
    }
    let status: ExitStatus = child.wait()?;
    let _ = reader.join();
    let err = errors.join().unwrap_or_default();
    if timed_out {
        bail!(
            "`{what}` took longer than {timeout:?}; stderr:\n{}",
            err.trim_end()
        );
    }
    if !status.success() {
        bail!("`{what}` failed ({status}):\n{}", err.trim_end());
    }
    if awaited.is_some() && line_at.is_none() {
        bail!("`{what}` never printed the line awaited; stdout:\n{out}");
    }
    Ok(Watched {
        line_at,
        stdout: out,
    })
}

/// The pid of the `brisk-snapshotter` serving `root`, found by its command line (the harness
/// keeps the child to itself).
pub fn snapshotter_pid(snapshotter: &Snapshotter) -> Result<u32> {
    let root = snapshotter.root.as_os_str().as_encoded_bytes().to_vec();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let serves_root = args.windows(2).any(|w| w[0] == b"--root" && w[1] == root);
        let is_daemon = args
            .first()
            .is_some_and(|a| a.ends_with(b"brisk-snapshotter"));
        if serves_root && is_daemon {
            return Ok(pid);
        }
    }
    bail!(
        "No brisk-snapshotter process serves {}",
        snapshotter.root.display()
    )
}

/// `VmRSS` and `VmHWM` of `pid`, in KiB.
pub fn memory_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("No {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Stops `snapshotter` cleanly (unmounting and flushing its cache index) and starts a new one
/// on the same directory, root and socket.
pub fn restart_clean(snapshotter: Snapshotter, dir: &Path, args: &[&str]) -> Result<Snapshotter> {
    let mut old = snapshotter;
    old.stop_clean()?;
    // Dropped before the new one starts: its drop detaches whatever is mounted under the root.
    drop(old);
    Snapshotter::start(dir, args)
}

/// A scratch directory for one run, removed with everything in it when dropped.
pub fn scratch(base: &Path, name: &str) -> Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new().prefix(name).tempdir_in(base)?)
}

/// A socket path nothing listens on, for the proxy snapshotter entry of a containerd that
/// only uses overlayfs.
pub fn unused_socket(dir: &Path) -> PathBuf {
    dir.join("no-brisk.sock")
}

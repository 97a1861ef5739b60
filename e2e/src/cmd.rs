//! Running external commands with errors that say what ran and what it printed.
//!
//! It does not stream output or enforce timeouts: every command here is short, and a hung
//! one shows up as a hung test with its command line in the process list.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Output};

use anyhow::{bail, Context, Result};

/// Runs `cmd` to completion and returns its stdout as text. A non-zero exit is an error that
/// names the command line, the exit status and stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = run_output(cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}):\n{}",
            command_line(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    String::from_utf8(out.stdout)
        .with_context(|| format!("`{}` printed non-UTF-8", command_line(cmd)))
}

/// Runs `cmd` to completion and returns its output whatever the exit status; only a command
/// that cannot be started is an error. Stdin is empty unless the caller set it.
pub fn run_output(cmd: &mut Command) -> Result<Output> {
    cmd.output()
        .with_context(|| format!("Starting `{}`", command_line(cmd)))
}

/// The command as a shell-like line, for messages.
pub fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Stderr of a finished command, as text.
pub fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The sha256 of a file's content, as hex, computed by `sha256sum`.
pub fn sha256_file(path: &Path) -> Result<String> {
    // The file goes in on stdin, so its name never needs sha256sum's escaping.
    let stdout = run(Command::new("sha256sum").stdin(File::open(path)?))?;
    match stdout.split_whitespace().next() {
        Some(hex) if hex.len() == 64 => Ok(hex.to_string()),
        _ => bail!(
            "Unexpected sha256sum output for {}: {stdout:?}",
            path.display()
        ),
    }
}

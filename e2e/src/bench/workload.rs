//! The workloads the comparison starts: what image each runs, what it waits for to call the
//! container ready, and how its image is built from the Debian archive.
//!
//! The quick comparison starts a Python hello (`py`) and a Flask service (`flask`); `--full`
//! adds a Python data/ML job (`ml`) and three starts that stress a lazy snapshotter in other
//! ways: `modules`, 3000 small modules and their bytecode, many files opened once each;
//! `clang`, a compile that pages in the 105 MiB libLLVM; `mmap`, a 1 GiB file mapped and
//! read at 500 random places, 3% of it.
//!
//! Adding a workload is one more entry in `ALL`: a Debian package list, the files it adds (or
//! has generated when its image is built), its command and its readiness signal. Nothing here
//! times anything; callers take the instant `start_until_ready` returns.

use std::net::{Ipv4Addr, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::images::PY_CMD;
use super::stack::{ctr, unique, watch_for, STEP_TIMEOUT};
use crate::daemons::Containerd;
use crate::registry::answers_200;

/// What makes a started container count as ready.
#[derive(Clone, Copy, Debug, Serialize)]
pub enum Ready {
    /// A stdout line equal to this.
    Line(&'static str),
    /// The first non-empty stdout line, whatever it says.
    FirstLine,
    /// The first `200` to `GET /` on the port given in the `PORT` environment variable; the
    /// container runs with the host's network and is killed once it answered.
    Http,
}

impl Ready {
    pub fn describe(self) -> String {
        match self {
            Ready::Line(l) => format!("stdout line `{l}`"),
            Ready::FirstLine => "first stdout line (the result)".to_owned(),
            Ready::Http => "first HTTP 200 on `GET /` (host network)".to_owned(),
        }
    }
}

/// Files an image builder writes from a few parameters. The same parameters give the same
/// bytes, so an image rebuilt from the same recipe holds the same content.
#[derive(Clone, Copy, Debug, Serialize)]
pub enum Generated {
    /// `packages` Python packages of `modules` modules each under `/app`, with their bytecode
    /// compiled in the image, as real images ship it, so that a start reads `.pyc` files and
    /// compiles nothing; `/app/main.py` imports them all and prints `ready N`, N the number of
    /// modules it imported.
    PythonApp {
        packages: u32,
        modules: u32,
        seed: u64,
    },
    /// `bytes` incompressible bytes at `path` (inside the image).
    SeededFile {
        path: &'static str,
        bytes: u64,
        seed: u64,
    },
}

impl Generated {
    pub fn describe(&self) -> String {
        match *self {
            Generated::PythonApp {
                packages, modules, ..
            } => format!("{} generated Python modules", packages * modules),
            Generated::SeededFile { path, bytes, .. } => {
                format!("/{path}: {} MiB that do not compress", bytes >> 20)
            }
        }
    }
}

/// One kind of container start.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Workload {
    /// The image's repository name in the benchmark registry, and the key in the results.
    pub name: &'static str,
    pub title: &'static str,
    pub ready: Ready,
    /// Debian packages on top of minbase; empty for the `py` image the cold-start benchmark
    /// builds, which is reused as it is.
    pub packages: &'static [&'static str],
    /// Files added to the image: path inside it, content.
    pub files: &'static [(&'static str, &'static str)],
    /// Content made when the image is built, after `files`: too many or too large files to
    /// spell out here.
    pub generated: &'static [Generated],
    /// The image's command. `ctr run` passes it explicitly, and `ctr-remote image optimize`
    /// runs it as the image's own, so both run the same thing.
    pub cmd: &'static [&'static str],
    /// Longest `ctr-remote image optimize` watches the workload (it stops earlier when the
    /// container exits); a server never exits, so this is how long its start is recorded.
    pub optimize_secs: u32,
    /// Part of the quick comparison, not only of `--full`.
    pub quick: bool,
}

const FLASK_APP: &str = r#"import os
from flask import Flask

app = Flask(__name__)


@app.route("/")
def index():
    return "ok\n"


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "8080")))
"#;

const ML_JOB: &str = r#"import numpy as np
import pandas as pd
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import train_test_split

X, y = make_classification(n_samples=2000, n_features=20, random_state=0)
frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(X.shape[1])])
frame["label"] = y
train, test = train_test_split(frame, test_size=0.25, random_state=0)
model = RandomForestClassifier(n_estimators=50, random_state=0)
model.fit(train.drop(columns="label"), train["label"])
score = model.score(test.drop(columns="label"), test["label"])
print(f"accuracy {score:.3f} on {len(test)} rows, numpy {np.__version__}")
"#;

/// Where `mmap` keeps its weights (`INFER_PY` opens `/data/weights.bin`), and how big they are.
const WEIGHTS_FILE: &str = "data/weights.bin";
const WEIGHTS_BYTES: u64 = 1 << 30;

/// A sparse model's first inference touches a small share of its weights, scattered: 500
/// pieces of 64 KiB (32 MiB, about 3% of the file). Copying each piece out of the map faults
/// in all of its pages; the checksum keeps the reads from being skipped.
const INFER_PY: &str = r#"import mmap
import random

PIECE = 64 << 10
PIECES = 500
PAGE = 4 << 10

with open("/data/weights.bin", "rb") as f:
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as weights:
        rng = random.Random(7)
        last_page = (len(weights) - PIECE) // PAGE
        checksum = 0
        for _ in range(PIECES):
            offset = rng.randrange(last_page + 1) * PAGE
            piece = weights[offset : offset + PIECE]
            checksum = (checksum * 31 + piece[-1]) & 0xFFFFFFFF
print(f"ready {checksum:08x}", flush=True)
"#;

pub const PY: Workload = Workload {
    name: "py",
    title: "Python hello",
    ready: Ready::Line("ready"),
    packages: &[],
    files: &[],
    generated: &[],
    cmd: PY_CMD,
    optimize_secs: 30,
    quick: true,
};

pub const ALL: &[Workload] = &[
    PY,
    Workload {
        name: "flask",
        title: "Flask web service",
        ready: Ready::Http,
        packages: &["python3", "python3-flask"],
        files: &[("app/app.py", FLASK_APP)],
        generated: &[],
        cmd: &["python3", "/app/app.py"],
        optimize_secs: 10,
        quick: true,
    },
    Workload {
        name: "ml",
        title: "Python data/ML job",
        ready: Ready::FirstLine,
        packages: &[
            "python3",
            "python3-numpy",
            "python3-pandas",
            "python3-sklearn",
        ],
        files: &[("app/job.py", ML_JOB)],
        generated: &[],
        cmd: &["python3", "/app/job.py"],
        optimize_secs: 120,
        quick: false,
    },
    Workload {
        name: "modules",
        title: "Python app, 3000 modules",
        // Exact, so that a start which imported fewer modules does not count as ready; a
        // test keeps it in step with the counts below.
        ready: Ready::Line("ready 3000"),
        packages: &["python3"],
        files: &[],
        generated: &[Generated::PythonApp {
            packages: 30,
            modules: 100,
            seed: 0x3000,
        }],
        cmd: &["python3", "/app/main.py"],
        optimize_secs: 30,
        quick: false,
    },
    Workload {
        name: "clang",
        title: "C compiler, libLLVM paged in",
        ready: Ready::Line("compiled"),
        // Debian's `clang` is clang-14, linked against libclang-cpp14 and the 105 MiB
        // libLLVM-14; `/usr/bin/clang` is its symlink.
        packages: &["clang"],
        files: &[("app/hello.c", HELLO_C)],
        generated: &[],
        cmd: &[
            "sh",
            "-c",
            "clang -O2 -c /app/hello.c -o /tmp/hello.o && echo compiled",
        ],
        optimize_secs: 60,
        quick: false,
    },
    Workload {
        name: "mmap",
        title: "1 GiB weights file, mmapped, 3% read at random",
        ready: Ready::FirstLine,
        packages: &["python3"],
        files: &[("app/infer.py", INFER_PY)],
        generated: &[Generated::SeededFile {
            path: WEIGHTS_FILE,
            bytes: WEIGHTS_BYTES,
            seed: 0x3e16,
        }],
        cmd: &["python3", "/app/infer.py"],
        optimize_secs: 60,
        quick: false,
    },
];

/// A loopback port nothing listens on right now, for a server with the host's network.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

impl Workload {
    /// `ctr run --rm` of `image` on `snapshotter` until the container is ready; the instant
    /// it was. A server is killed once it answered.
    pub fn start_until_ready(
        &self,
        containerd: &Containerd,
        snapshotter: &str,
        image: &str,
    ) -> Result<Instant> {
        let id = unique(self.name);
        let mut args = vec!["run", "--rm", "--snapshotter", snapshotter];
        let port = match self.ready {
            Ready::Http => free_port()?.to_string(),
            Ready::Line(_) | Ready::FirstLine => String::new(),
        };
        let env = format!("PORT={port}");
        if !port.is_empty() {
            args.extend(["--net-host", "--env", &env]);
        }
        args.extend([image, &id]);
        args.extend_from_slice(self.cmd);
        let mut cmd = ctr(containerd, &args);
        match self.ready {
            Ready::Line(line) => watch_for(&mut cmd, Some(&|l: &str| l == line), STEP_TIMEOUT),
            Ready::FirstLine => watch_for(&mut cmd, Some(&|l: &str| !l.is_empty()), STEP_TIMEOUT),
            Ready::Http => return serve_until_200(containerd, &mut cmd, &id, &port),
        }?
        .line_at
        .context("No ready line")
    }
}

/// Starts `cmd`, a server container named `id`, polls `http://127.0.0.1:PORT/` until it
/// answers 200, then kills the container and waits for `ctr run` to end.
fn serve_until_200(
    containerd: &Containerd,
    cmd: &mut Command,
    id: &str,
    port: &str,
) -> Result<Instant> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("Starting `ctr run`")?;
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + STEP_TIMEOUT;
    let ready = loop {
        if answers_200(&addr, "/") {
            break Ok(Instant::now());
        }
        if let Some(status) = child.try_wait()? {
            let out = child.wait_with_output()?;
            bail!(
                "The server exited ({status}) before answering:\n{}",
                String::from_utf8_lossy(&out.stderr).trim_end()
            );
        }
        if Instant::now() > deadline {
            break Err(anyhow::anyhow!(
                "No HTTP 200 on {addr} within {STEP_TIMEOUT:?}"
            ));
        }
        // Short enough not to blur a start that takes a few hundred milliseconds.
        std::thread::sleep(Duration::from_millis(10));
    };
    // The task's exit lets `ctr run --rm` remove the container and return.
    let _ = containerd.ctr(&["task", "kill", "--signal", "SIGKILL", id]);
    let exit_deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait()?.is_none() {
        if Instant::now() > exit_deadline {
            // Only this child, by its pid.
            let _ = child.kill();
            let _ = child.wait();
            bail!("`ctr run` of {id} did not end after its task was killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    ready
}

/// `clang`'s input, at the end of the file as it is long. It includes no header (the image has
/// libc's, as `clang` depends on libc6-dev), so that what a start reads is the compiler and
/// its libraries. It has enough loops, structs, recursion and small functions to inline that
/// `-O2` runs its passes for real.
const HELLO_C: &str = include_str!("workloads/hello.c");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_python_app_is_ready_when_all_its_modules_are_imported() {
        for w in ALL {
            for g in w.generated {
                if let Generated::PythonApp {
                    packages, modules, ..
                } = g
                {
                    let line = format!("ready {}", packages * modules);
                    assert!(
                        matches!(w.ready, Ready::Line(l) if l == line),
                        "{}: ready is {:?}, the app prints `{line}`",
                        w.name,
                        w.ready
                    );
                }
            }
        }
    }
}

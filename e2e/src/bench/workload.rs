//! The workloads the comparison starts: what image each runs, what it waits for to call the
//! container ready, and how its image is built from the Debian archive.
//!
//! Adding a workload is one more entry in `ALL`: a Debian package list, the files it adds, its
//! command and its readiness signal. Nothing here times anything; callers take the instant
//! `start_until_ready` returns.

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

pub const PY: Workload = Workload {
    name: "py",
    title: "Python hello",
    ready: Ready::Line("ready"),
    packages: &[],
    files: &[],
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
        cmd: &["python3", "/app/job.py"],
        optimize_secs: 120,
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

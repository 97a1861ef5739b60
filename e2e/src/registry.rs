//! A private `docker-registry` (distribution) on a loopback port, one per test.
//!
//! It stores blobs in its own temporary directory, so a test can reach into the storage and
//! damage a blob on purpose. It has no TLS: loopback registries are plain HTTP for both Brisk
//! and skopeo (with `--tls-verify=false`). It is open unless started with `RegistryAuth`
//! (an htpasswd file, or a token service whose JWTs it checks against a certificate).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

/// How long a registry may take to answer `/v2/` after it is spawned.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Who the registry lets in.
#[derive(Clone, Debug)]
pub enum RegistryAuth {
    /// Basic auth against an htpasswd file (bcrypt), read when the registry starts.
    Htpasswd(PathBuf),
    /// Bearer tokens from `realm`, signed by the key of the certificate in `root_cert`.
    Token {
        realm: String,
        service: String,
        issuer: String,
        root_cert: PathBuf,
    },
}

impl RegistryAuth {
    fn config(&self) -> String {
        match self {
            Self::Htpasswd(path) => format!(
                "auth:\n  htpasswd:\n    realm: brisk-test\n    path: {}\n",
                path.display()
            ),
            Self::Token {
                realm,
                service,
                issuer,
                root_cert,
            } => format!(
                "auth:\n  token:\n    realm: {realm}\n    service: {service}\n    \
                 issuer: {issuer}\n    rootcertbundle: {}\n",
                root_cert.display()
            ),
        }
    }
}

/// Writes an htpasswd file (bcrypt, as the registry requires) holding only `user`.
pub fn write_htpasswd(path: &std::path::Path, user: &str, password: &str) -> Result<()> {
    let line = crate::run(Command::new("htpasswd").args(["-Bbn", user, password]))?;
    std::fs::write(path, line.trim_end().to_owned() + "\n")?;
    Ok(())
}

pub struct Registry {
    child: Child,
    port: u16,
    config: PathBuf,
    auth: bool,
    /// Holds the config, the log and the storage; removed after the child is gone.
    dir: TempDir,
}

impl Registry {
    /// Spawns `docker-registry serve` on a free loopback port and waits until it answers.
    pub fn start() -> Result<Self> {
        Self::start_with(None)
    }

    /// A registry that lets in only what `auth` allows.
    pub fn start_with(auth: Option<&RegistryAuth>) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("brisk-registry-")
            .tempdir()?;
        // The port is free now; the registry binds it a moment later. Another process
        // taking it in between shows up as the registry exiting, with its log in the error.
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log:\n  level: warn\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: 127.0.0.1:{port}\n{auth}",
                dir.path().join("data").display(),
                auth = auth.map(RegistryAuth::config).unwrap_or_default(),
            ),
        )?;
        let child = spawn(&config, &dir.path().join("registry.log"))?;
        let mut registry = Self {
            child,
            port,
            config,
            auth: auth.is_some(),
            dir,
        };
        registry.wait_ready()?;
        Ok(registry)
    }

    /// Stops the registry and starts it again on the same port and storage: how a test
    /// makes it read a changed htpasswd file.
    pub fn restart(&mut self) -> Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(&self.config, &self.dir.path().join("registry.log"))?;
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("docker-registry exited ({status}):\n{}", self.log());
            }
            if self.answers_v2() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "docker-registry did not answer on {} within {START_TIMEOUT:?}:\n{}",
                    self.addr(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn answers_v2(&self) -> bool {
        // With auth on, `/v2/` answers 401 with its challenge once the registry is up.
        answers_200(&self.addr(), "/v2/") || (self.auth && answers_401(&self.addr(), "/v2/"))
    }

    /// `127.0.0.1:PORT`, the registry part of an image reference.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A reference to `name` (`repo:tag`) in this registry.
    pub fn image(&self, name: &str) -> String {
        format!("{}/{name}", self.addr())
    }

    /// The storage root (`rootdirectory` in the config).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Where the filesystem driver keeps the bytes of blob `digest` (`sha256:HEX`).
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64)
            .with_context(|| format!("Not a sha256 digest: {digest}"))?;
        Ok(self
            .data_dir()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data"))
    }

    /// Whether anything was ever written under repository `repo`.
    pub fn has_repository(&self, repo: &str) -> bool {
        self.data_dir()
            .join("docker/registry/v2/repositories")
            .join(repo)
            .exists()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }
}

fn spawn(config: &std::path::Path, log: &std::path::Path) -> Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    Command::new("docker-registry")
        .arg("serve")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("Starting docker-registry")
}

/// Whether `GET PATH` on `addr` gets a 401.
fn answers_401(addr: &str, path: &str) -> bool {
    status_line(addr, path)
        .is_some_and(|r| r.starts_with("HTTP/1.0 401") || r.starts_with("HTTP/1.1 401"))
}

/// Whether `GET PATH` on `addr` (`127.0.0.1:PORT`) gets a 200, asked with the smallest
/// possible HTTP/1.0 request. A refused connection is a plain `false`.
pub fn answers_200(addr: &str, path: &str) -> bool {
    status_line(addr, path)
        .is_some_and(|r| r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200"))
}

fn status_line(addr: &str, path: &str) -> Option<String> {
    let ask = || -> std::io::Result<String> {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    };
    ask().ok()
}

impl Drop for Registry {
    fn drop(&mut self) {
        // `Child::kill` signals exactly this child's pid; reaping it keeps no zombie behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! Private images on a Kubernetes node: the node has no registry credentials, only the
//! kubelet's `PullImage` carries them, through Brisk's CRI image-service proxy. With basic
//! auth (htpasswd) and with bearer tokens: the right credentials start the pod lazily;
//! wrong ones fail the pull as containerd's own would, with nothing mounted or fetched;
//! after the credentials rotate, the next pod's pull brings the new ones and its reads work.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use brisk_e2e::cri::basic_auth;
use brisk_e2e::token::TokenServer;
use brisk_e2e::{
    private_registry_gate, run, sample_in_registry, write_htpasswd, Proxy, Registry, RegistryAuth,
};

use crate::cri::{Node, FILES, FILES_TEXT};

const USER: &str = "puller";
const FIRST: &str = "first-secret-3f9a";
const SECOND: &str = "second-secret-7c21";

/// How long the token service's tokens last: short, so a rotation outlives them.
const TOKEN_LIFETIME: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, Debug)]
enum Kind {
    Basic,
    Bearer,
}

/// A node and a private registry (behind a counting proxy) holding the converted sample as
/// `app:lazy`, readable only with `USER`'s password, `FIRST` to begin with.
struct Private {
    node: Node,
    registry: Registry,
    proxy: Proxy,
    token: Option<TokenServer>,
    htpasswd: PathBuf,
}

impl Private {
    fn start(kind: Kind) -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let open = sample_in_registry(tmp.path(), false, &[])?.registry;
        let htpasswd = tmp.path().join("htpasswd");
        let (auth, token) = match kind {
            Kind::Basic => {
                write_htpasswd(&htpasswd, USER, FIRST)?;
                (RegistryAuth::Htpasswd(htpasswd.clone()), None)
            }
            Kind::Bearer => {
                let token =
                    TokenServer::start(&tmp.path().join("token"), USER, FIRST, TOKEN_LIFETIME)?;
                (token.registry_auth(), Some(token))
            }
        };
        let registry = Registry::start_with(Some(&auth))?;
        run(Command::new("skopeo").args([
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            &format!("--dest-creds={USER}:{FIRST}"),
            &format!("docker://{}", open.image("sample:lazy")),
            &format!("docker://{}", registry.image("app:lazy")),
        ]))?;
        let proxy = Proxy::start(&registry.addr())?;
        let node = Node::start_with(tmp, open, &[proxy.addr()], true)?;
        Ok(Self {
            node,
            registry,
            proxy,
            token,
            htpasswd,
        })
    }

    fn image(&self) -> String {
        self.proxy.image("app:lazy")
    }

    /// A pod of the private image with `password`; its exit code and output.
    fn run(&self, password: &str, args: &[&str]) -> Result<(i32, String)> {
        let mut command = vec!["/bin/busybox"];
        command.extend_from_slice(args);
        let logs = self.node.logs();
        self.node.cri.run_to_exit(
            &crate::cri::unique("private"),
            &logs,
            &self.image(),
            Some(basic_auth(USER, password)),
            &command,
        )
    }

    /// Only `password` opens the registry from now on.
    fn rotate(&mut self, password: &str) -> Result<()> {
        match &self.token {
            Some(token) => {
                token.set_password(password);
                // Tokens issued for the old password must run out too.
                std::thread::sleep(TOKEN_LIFETIME + Duration::from_secs(1));
            }
            None => {
                write_htpasswd(&self.htpasswd, USER, password)?;
                self.registry.restart()?;
            }
        }
        Ok(())
    }

    fn mounted(&self) -> usize {
        self.node
            .snapshotter
            .log()
            .matches("lazy layer mounted")
            .count()
    }

    /// No password reached the daemon's log.
    fn assert_no_secret_logged(&self) {
        let log = self.node.snapshotter.log();
        for secret in [FIRST, SECOND] {
            assert!(!log.contains(secret), "a password is in the log:\n{log}");
        }
    }
}

fn lazy_with_the_pulls_credentials(kind: Kind) -> Result<()> {
    let private = Private::start(kind)?;
    let (code, out) = private.run(FIRST, &["cat", FILES[0], FILES[1]])?;
    assert_eq!((code, out.as_str()), (0, FILES_TEXT));
    assert_eq!(private.mounted(), 2, "{}", private.node.snapshotter.log());
    let fetched = private.proxy.counts().blob_bytes;
    let image = private.node.layer_bytes("sample:lazy")?;
    println!("registry served {fetched} of the image's {image} layer bytes");
    assert!(
        fetched * 10 < image * 7,
        "fetched {fetched} of {image} bytes"
    );
    private.assert_no_secret_logged();
    Ok(())
}

#[test]
fn a_private_image_starts_lazily_with_the_pulls_basic_credentials() -> Result<()> {
    if !private_registry_gate() {
        return Ok(());
    }
    lazy_with_the_pulls_credentials(Kind::Basic)
}

#[test]
fn a_private_image_starts_lazily_with_the_pulls_token_credentials() -> Result<()> {
    if !private_registry_gate() {
        return Ok(());
    }
    lazy_with_the_pulls_credentials(Kind::Bearer)
}

fn wrong_credentials_fail_the_pull(kind: Kind) -> Result<()> {
    let private = Private::start(kind)?;
    let pod = private.node.cri.run_pod("wrong", &private.node.logs())?;
    let snapshots = private.node.snapshots()?.len();
    for auth in [Some(basic_auth(USER, "not-the-password")), None] {
        let pulled = private
            .node
            .cri
            .pull(&private.image(), auth, Some(&pod.config));
        assert!(pulled.is_err(), "{kind:?}: the pull succeeded");
    }
    assert!(private.node.cri.image_status(&private.image())?.is_none());
    assert_eq!(private.mounted(), 0);
    assert_eq!(private.node.fuse_mounts(), 0);
    assert_eq!(private.node.snapshots()?.len(), snapshots);
    assert_eq!(private.proxy.counts().blob_bytes, 0, "a blob was served");
    private.node.cri.stop_pod(&pod)?;
    private.node.cri.remove_pod(&pod)?;
    private.assert_no_secret_logged();
    Ok(())
}

#[test]
fn wrong_basic_credentials_fail_the_pull_and_mount_nothing() -> Result<()> {
    if !private_registry_gate() {
        return Ok(());
    }
    wrong_credentials_fail_the_pull(Kind::Basic)
}

#[test]
fn wrong_token_credentials_fail_the_pull_and_mount_nothing() -> Result<()> {
    if !private_registry_gate() {
        return Ok(());
    }
    wrong_credentials_fail_the_pull(Kind::Bearer)
}

fn rotation(kind: Kind) -> Result<()> {
    let mut private = Private::start(kind)?;
    let (code, out) = private.run(FIRST, &["cat", FILES[0], FILES[1]])?;
    assert_eq!((code, out.as_str()), (0, FILES_TEXT));
    private.rotate(SECOND)?;
    // The revoked password fails the pull, and does not replace the last good one.
    assert!(private.run(FIRST, &["true"]).is_err());
    let before = private.proxy.counts().blob_bytes;
    // The big file was never read: every one of its chunks comes from the registry now,
    // on the layers the first pod mounted, with the credentials of this pod's pull.
    let (code, out) = private.run(SECOND, &["wc", "-c", "/app/big.bin"])?;
    assert_eq!((code, out.trim()), (0, "3146962 /app/big.bin"), "{kind:?}");
    let fetched = private.proxy.counts().blob_bytes - before;
    assert!(fetched > 3 << 20, "{kind:?}: fetched {fetched} bytes");
    assert_eq!(private.mounted(), 2, "{kind:?}: layers were mounted again");
    private.assert_no_secret_logged();
    Ok(())
}

#[test]
fn rotated_basic_credentials_serve_the_next_pod_lazily() -> Result<()> {
    if !private_registry_gate() {
        return Ok(());
    }
    rotation(Kind::Basic)
}

#[test]
fn rotated_token_credentials_serve_the_next_pod_lazily() -> Result<()> {
    if !private_registry_gate() {
        return Ok(());
    }
    rotation(Kind::Bearer)
}

/// A credential provider's identity token (an OAuth2 refresh token) instead of a password:
/// containerd and Brisk both exchange it at the token service, and the pod starts lazily.
#[test]
fn a_private_image_starts_lazily_with_an_identity_token() -> Result<()> {
    if !private_registry_gate() {
        return Ok(());
    }
    let private = Private::start(Kind::Bearer)?;
    let token = private.token.as_ref().expect("a token service");
    token.set_refresh_token("refresh-5be1");
    let auth = brisk_proto::runtime::v1::AuthConfig {
        identity_token: "refresh-5be1".into(),
        ..Default::default()
    };
    let logs = private.node.logs();
    let command = ["/bin/busybox", "cat", FILES[0], FILES[1]];
    let (code, out) =
        private
            .node
            .cri
            .run_to_exit("identity", &logs, &private.image(), Some(auth), &command)?;
    assert_eq!((code, out.as_str()), (0, FILES_TEXT));
    assert_eq!(private.mounted(), 2, "{}", private.node.snapshotter.log());
    assert!(!private.node.snapshotter.log().contains("refresh-5be1"));
    Ok(())
}

//! A token service for a private registry, after the distribution token auth spec: a
//! client sends basic credentials and the scope it wants to `GET /token` (or, holding a
//! refresh token, `POST`s it as a form: the OAuth2 flow identity tokens use), and gets a JWT
//! (RS256, its certificate in the `x5c` header) that `docker-registry` checks against the
//! certificate it was configured with.
//!
//! Test support only: one user, whose password the test can change (rotation), and tokens
//! that live as long as the test says. The user gets the actions it asks for on any
//! repository (the test pushes with it too); anonymous requests are refused.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::registry::RegistryAuth;
use crate::run;
use crate::server_thread::ServerThread;

/// The registry adds this much to a token's expiry for clock skew (distribution's `Leeway`),
/// so a token meant to last `lifetime` says it expires that much earlier.
const REGISTRY_LEEWAY: Duration = Duration::from_secs(60);

const SERVICE: &str = "brisk-test-registry";
const ISSUER: &str = "brisk-test-token-service";

pub struct TokenServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    cert: PathBuf,
    _server: ServerThread,
}

struct State {
    user: String,
    password: String,
    /// The refresh token (a CRI `identity_token`) the OAuth2 form may present instead.
    refresh_token: Option<String>,
    lifetime: Duration,
    key: ring::signature::RsaKeyPair,
    /// The certificate, DER, for the `x5c` header.
    cert_der: Vec<u8>,
    issued: u64,
    refused: u64,
}

impl TokenServer {
    /// Generates a key and certificate in `dir` (with openssl) and serves tokens for `user`
    /// with `password` on a free loopback port; each token is good for `lifetime`.
    pub fn start(dir: &Path, user: &str, password: &str, lifetime: Duration) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let (key_pem, cert) = (dir.join("key.pem"), dir.join("cert.pem"));
        run(Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=brisk-test-token-service", "-keyout"])
            .arg(&key_pem)
            .arg("-out")
            .arg(&cert))?;
        let key_der = dir.join("key.der");
        run(Command::new("openssl")
            .args(["pkcs8", "-topk8", "-nocrypt", "-outform", "DER", "-in"])
            .arg(&key_pem)
            .arg("-out")
            .arg(&key_der))?;
        let cert_der = dir.join("cert.der");
        run(Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert)
            .arg("-out")
            .arg(&cert_der))?;
        let key = ring::signature::RsaKeyPair::from_pkcs8(&std::fs::read(&key_der)?)
            .map_err(|e| anyhow::anyhow!("Token key: {e}"))?;
        let state = Arc::new(Mutex::new(State {
            user: user.to_owned(),
            password: password.to_owned(),
            refresh_token: None,
            lifetime,
            key,
            cert_der: std::fs::read(&cert_der)?,
            issued: 0,
            refused: 0,
        }));
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("Building the token service runtime")?;
        let shared = state.clone();
        let server = ServerThread::spawn("token-service", runtime, listener, move |l, stop| {
            serve(l, shared, stop)
        })?;
        Ok(Self {
            addr,
            state,
            cert,
            _server: server,
        })
    }

    /// The registry's side of this service.
    pub fn registry_auth(&self) -> RegistryAuth {
        RegistryAuth::Token {
            realm: format!("http://{}/token", self.addr),
            service: SERVICE.to_owned(),
            issuer: ISSUER.to_owned(),
            root_cert: self.cert.clone(),
        }
    }

    /// From now on only `password` gets a token (tokens already issued stay good until they
    /// expire, as with any token service).
    pub fn set_password(&self, password: &str) {
        self.lock().password = password.to_owned();
    }

    /// From now on `token` may be presented as an OAuth2 refresh token.
    pub fn set_refresh_token(&self, token: &str) {
        self.lock().refresh_token = Some(token.to_owned());
    }

    /// Tokens issued and requests refused so far.
    pub fn counts(&self) -> (u64, u64) {
        let s = self.lock();
        (s.issued, s.refused)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("not poisoned")
    }
}

async fn serve(
    listener: TcpListener,
    state: Arc<Mutex<State>>,
    mut stopped: oneshot::Receiver<()>,
) {
    loop {
        let stream = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move {
                    let (head, body) = req.into_parts();
                    // A form is a few hundred bytes; more is not read.
                    let form = Limited::new(body, 64 << 10)
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    Ok::<_, Infallible>(answer(&state, &Request::from_parts(head, ()), &form))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(state: &Mutex<State>, req: &Request<()>, form: &[u8]) -> Response<Full<Bytes>> {
    let mut state = state.lock().expect("not poisoned");
    let respond = |status, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    let authorized = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .is_some_and(|pair| pair == format!("{}:{}", state.user, state.password));
    // The OAuth2 form carries the scope itself; a GET carries it in the query.
    let form = String::from_utf8_lossy(form).into_owned();
    let refreshed = req.method() == hyper::Method::POST
        && state
            .refresh_token
            .as_ref()
            .is_some_and(|t| form.split('&').any(|kv| kv == format!("refresh_token={t}")));
    if req.uri().path() != "/token" || !(authorized || refreshed) {
        state.refused += 1;
        return respond(
            StatusCode::UNAUTHORIZED,
            r#"{"details":"bad credentials"}"#.into(),
        );
    }
    let params = if refreshed {
        form.as_str()
    } else {
        req.uri().query().unwrap_or_default()
    };
    let scopes: Vec<String> = params
        .split('&')
        .filter_map(|kv| kv.strip_prefix("scope="))
        .map(|v| {
            v.replace("%3A", ":")
                .replace("%2F", "/")
                .replace("%2C", ",")
        })
        .collect();
    let access: Vec<_> = scopes
        .iter()
        .filter_map(|s| {
            let mut parts = s.splitn(3, ':');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("repository"), Some(name), Some(actions)) => Some(json!({
                    "type": "repository",
                    "name": name,
                    "actions": actions.split(',').collect::<Vec<_>>(),
                })),
                _ => None,
            }
        })
        .collect();
    match sign(&state, access) {
        Ok(token) => {
            state.issued += 1;
            let body = json!({
                "token": token,
                "access_token": token,
                "expires_in": state.lifetime.as_secs(),
            });
            respond(StatusCode::OK, body.to_string())
        }
        Err(_) => respond(StatusCode::INTERNAL_SERVER_ERROR, "{}".into()),
    }
}

fn sign(state: &State, access: Vec<serde_json::Value>) -> Result<String> {
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;
    let expires = now + state.lifetime.as_secs() as i64 - REGISTRY_LEEWAY.as_secs() as i64;
    let header = json!({
        "typ": "JWT",
        "alg": "RS256",
        "x5c": [base64::engine::general_purpose::STANDARD.encode(&state.cert_der)],
    });
    let claims = json!({
        "iss": ISSUER,
        "sub": state.user,
        "aud": SERVICE,
        "exp": expires,
        "nbf": now - 1,
        "iat": now,
        "jti": format!("{now}-{}", state.issued),
        "access": access,
    });
    let signed = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let mut signature = vec![0; state.key.public().modulus_len()];
    state
        .key
        .sign(
            &ring::signature::RSA_PKCS1_SHA256,
            &ring::rand::SystemRandom::new(),
            signed.as_bytes(),
            &mut signature,
        )
        .map_err(|e| anyhow::anyhow!("Signing a token: {e}"))?;
    Ok(format!("{signed}.{}", b64(&signature)))
}

//! Registry authentication: `WWW-Authenticate` challenges, bearer tokens and the docker
//! credential store (`~/.docker/config.json`, `DOCKER_CONFIG`, credential helpers).

use std::collections::HashMap;

use serde::Deserialize;

use super::{AuthFailure, RegistryError};
use crate::{Error, Result};

/// A parsed `WWW-Authenticate` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

impl Challenge {
    pub fn parse(header: &str) -> Option<Self> {
        let (scheme, rest) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return Some(Self::Basic);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let params = parse_params(rest);
        Some(Self::Bearer {
            realm: params.get("realm")?.clone(),
            service: params.get("service").cloned(),
            scope: params.get("scope").cloned(),
        })
    }
}

/// `key="value", key2=value2`; commas inside quotes belong to the value (scopes use them).
fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            return out;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = chars
                .by_ref()
                .take_while(|c| *c != ',')
                .collect::<String>()
                .trim()
                .to_owned();
        }
        out.insert(key.trim().to_ascii_lowercase(), value);
    }
}

/// What the docker credential store (or an image pull) holds for a registry.
#[derive(Clone)]
pub enum Credentials {
    Basic {
        username: String,
        password: String,
    },
    /// An OAuth2 refresh token, exchanged at the token endpoint.
    IdentityToken(String),
}

/// Secrets never reach a log through `{:?}`: only the user name is shown.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            Self::IdentityToken(_) => f.write_str("IdentityToken(<redacted>)"),
        }
    }
}

/// `lookup` from async code: it reads the docker config and may run a credential helper (a
/// process that can take its time), so the worker hands its other tasks on while it waits.
pub fn lookup_off_worker(registry: &str) -> Option<Credentials> {
    crate::blocking::in_place(|| lookup(registry))
}

/// Looks up credentials for `registry` (`host[:port]`). No entry is not an error: anonymous
/// access is the common case for pulls.
pub fn lookup(registry: &str) -> Option<Credentials> {
    match docker_credential::get_credential(registry) {
        Ok(docker_credential::DockerCredential::UsernamePassword(username, password)) => {
            Some(Credentials::Basic { username, password })
        }
        Ok(docker_credential::DockerCredential::IdentityToken(t)) => {
            Some(Credentials::IdentityToken(t))
        }
        Err(err) => {
            tracing::debug!(registry, %err, "no docker credentials");
            None
        }
    }
}

/// A token response is a small JSON object (real tokens are a few KiB); a larger body is
/// refused rather than buffered.
const MAX_TOKEN_RESPONSE: usize = 1 << 20;

/// The whole token exchange, body included: a token endpoint that trickles its answer would
/// otherwise hold the request forever, since each read only has to make some progress.
const TOKEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
}

/// Asks the challenge's realm for a token for `scope`.
pub(crate) async fn fetch_token(
    http: &reqwest::Client,
    registry: &str,
    realm: &str,
    service: Option<&str>,
    scope: &str,
    creds: Option<&Credentials>,
) -> Result<String> {
    let auth_err = |reason: AuthFailure| -> Error {
        RegistryError::Auth {
            registry: registry.to_owned(),
            reason,
        }
        .into()
    };
    let mut query: Vec<(&str, &str)> = vec![("scope", scope)];
    if let Some(s) = service {
        query.push(("service", s));
    }
    let req = match creds {
        Some(Credentials::IdentityToken(refresh)) => {
            let mut form = query.clone();
            form.extend([
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh),
                ("client_id", "brisk"),
            ]);
            http.post(realm).form(&form)
        }
        Some(Credentials::Basic { username, password }) => http
            .get(realm)
            .query(&query)
            .basic_auth(username, Some(password)),
        None => http.get(realm).query(&query),
    };
    let resp = req
        .timeout(TOKEN_TIMEOUT)
        .send()
        .await
        .map_err(|e| auth_err(AuthFailure::TokenRequest(e)))?;
    if !resp.status().is_success() {
        return Err(auth_err(AuthFailure::TokenStatus(resp.status().as_u16())));
    }
    let bytes = match super::read_limited(resp, realm, MAX_TOKEN_RESPONSE).await {
        Ok(bytes) => bytes,
        Err(e @ Error::OverLimit { .. }) => return Err(e),
        Err(e) => return Err(auth_err(AuthFailure::TokenBody(Box::new(e)))),
    };
    let body: TokenResponse =
        serde_json::from_slice(&bytes).map_err(|e| auth_err(AuthFailure::TokenJson(e)))?;
    body.token
        .or(body.access_token)
        .ok_or_else(|| auth_err(AuthFailure::NoToken))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenge_with_commas_in_scope() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("reg".into()),
                scope: Some("repository:a/b:pull,push".into()),
            }
        );
    }

    #[test]
    fn parses_basic_and_rejects_unknown_schemes() {
        assert_eq!(
            Challenge::parse(r#"Basic realm="x""#),
            Some(Challenge::Basic)
        );
        assert_eq!(Challenge::parse("Negotiate abc"), None);
        assert_eq!(Challenge::parse("Bearer service=x"), None);
    }
}

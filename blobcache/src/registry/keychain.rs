//! Credentials handed over by image pulls (on a Kubernetes node, the `AuthConfig` of a CRI
//! `PullImage`), kept in memory for the registry client, each scoped to one registry host
//! and one repository.
//!
//! It holds the newest pull's credentials per scope and nothing else: no file, no log line,
//! no `Debug` output shows a secret, and a scope's credentials are never offered for another
//! host (a mirror, a redirect target) or another repository. It does not decide whether
//! credentials are good; the registry does, at the next request.

use std::collections::HashMap;
use std::sync::Mutex;

use super::Credentials;

/// More scopes than a node pulls from in its life; past it the scope set longest ago goes,
/// so a flood of pulls cannot grow the daemon's memory.
pub const MAX_SCOPES: usize = 4096;

/// A secret or a name longer than this is not a credential a registry would accept; it is
/// refused rather than kept.
pub const MAX_FIELD_BYTES: usize = 16 << 10;

#[derive(Default)]
pub struct Keychain {
    /// A std mutex: held for map operations only, never across an await.
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    scopes: HashMap<(String, String), Entry>,
    /// Increases with every `put`: an entry's generation names the credentials it holds.
    generation: u64,
}

#[derive(Clone)]
struct Entry {
    creds: Credentials,
    generation: u64,
}

/// What a `put` replaced, to put it back if the pull that brought the new credentials fails.
pub struct Replaced {
    scope: (String, String),
    generation: u64,
    previous: Option<Entry>,
}

impl Keychain {
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps `creds` for `repository` on `registry` (`host[:port]`), replacing what was
    /// there. `None` when a field is too long to be a credential.
    pub fn put(&self, registry: &str, repository: &str, creds: Credentials) -> Option<Replaced> {
        let too_long = match &creds {
            Credentials::Basic { username, password } => {
                username.len() > MAX_FIELD_BYTES || password.len() > MAX_FIELD_BYTES
            }
            Credentials::IdentityToken(token) => token.len() > MAX_FIELD_BYTES,
        };
        if too_long || registry.len() > MAX_FIELD_BYTES || repository.len() > MAX_FIELD_BYTES {
            return None;
        }
        let mut inner = self.inner.lock().expect("not poisoned");
        inner.generation += 1;
        let generation = inner.generation;
        let scope = (registry.to_owned(), repository.to_owned());
        if !inner.scopes.contains_key(&scope) && inner.scopes.len() >= MAX_SCOPES {
            let oldest = inner
                .scopes
                .iter()
                .min_by_key(|(_, e)| e.generation)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                inner.scopes.remove(&oldest);
            }
        }
        let previous = inner
            .scopes
            .insert(scope.clone(), Entry { creds, generation });
        Some(Replaced {
            scope,
            generation,
            previous,
        })
    }

    /// Undoes `put` if nothing replaced its credentials since: a pull that failed leaves
    /// the credentials of the last one, so running containers keep reading.
    pub fn restore(&self, replaced: Replaced) {
        let mut inner = self.inner.lock().expect("not poisoned");
        let current = inner.scopes.get(&replaced.scope).map(|e| e.generation);
        if current != Some(replaced.generation) {
            return;
        }
        match replaced.previous {
            Some(entry) => inner.scopes.insert(replaced.scope, entry),
            None => inner.scopes.remove(&replaced.scope),
        };
    }

    /// The credentials for `repository` on `registry`, and their generation (which changes
    /// whenever they are replaced, so tokens fetched with older ones are not reused).
    pub fn get(&self, registry: &str, repository: &str) -> Option<(Credentials, u64)> {
        let inner = self.inner.lock().expect("not poisoned");
        inner
            .scopes
            .get(&(registry.to_owned(), repository.to_owned()))
            .map(|e| (e.creds.clone(), e.generation))
    }

    /// How many scopes hold credentials; the only thing about them anyone may see.
    pub fn len(&self) -> usize {
        self.inner.lock().expect("not poisoned").scopes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for Keychain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keychain")
            .field("scopes", &self.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(password: &str) -> Credentials {
        Credentials::Basic {
            username: "u".into(),
            password: password.into(),
        }
    }

    fn password(k: &Keychain, registry: &str, repository: &str) -> Option<String> {
        match k.get(registry, repository)?.0 {
            Credentials::Basic { password, .. } => Some(password),
            Credentials::IdentityToken(_) => None,
        }
    }

    #[test]
    fn scoped_to_host_and_repository_and_replaced_by_the_newest() {
        let k = Keychain::new();
        k.put("r:5000", "team/app", basic("one")).unwrap();
        assert_eq!(password(&k, "r:5000", "team/app").as_deref(), Some("one"));
        assert!(k.get("r:5000", "team/other").is_none());
        assert!(k.get("mirror:5000", "team/app").is_none());
        assert!(k.get("r:5001", "team/app").is_none());
        let first = k.get("r:5000", "team/app").unwrap().1;
        k.put("r:5000", "team/app", basic("two")).unwrap();
        let (_, second) = k.get("r:5000", "team/app").unwrap();
        assert_eq!(password(&k, "r:5000", "team/app").as_deref(), Some("two"));
        assert_ne!(first, second);
    }

    #[test]
    fn a_failed_pull_restores_the_last_good_credentials_unless_replaced_since() {
        let k = Keychain::new();
        k.put("r", "app", basic("good")).unwrap();
        let bad = k.put("r", "app", basic("bad")).unwrap();
        k.restore(bad);
        assert_eq!(password(&k, "r", "app").as_deref(), Some("good"));

        let bad = k.put("r", "app", basic("bad")).unwrap();
        k.put("r", "app", basic("newer")).unwrap();
        k.restore(bad);
        assert_eq!(password(&k, "r", "app").as_deref(), Some("newer"));

        let only = k.put("r", "fresh", basic("x")).unwrap();
        k.restore(only);
        assert!(k.get("r", "fresh").is_none());
    }

    #[test]
    fn bounded_in_scopes_and_field_sizes_and_debug_shows_no_secret() {
        let k = Keychain::new();
        for i in 0..MAX_SCOPES + 10 {
            k.put("r", &format!("repo{i}"), basic("secret-value"))
                .unwrap();
        }
        assert_eq!(k.len(), MAX_SCOPES);
        assert!(k.get("r", "repo0").is_none(), "the oldest scope goes first");
        assert!(k.get("r", &format!("repo{}", MAX_SCOPES + 9)).is_some());
        assert!(k
            .put("r", "big", basic(&"x".repeat(MAX_FIELD_BYTES + 1)))
            .is_none());
        assert!(!format!("{k:?}").contains("secret-value"));
        let creds = k.get("r", &format!("repo{}", MAX_SCOPES + 9)).unwrap().0;
        assert!(!format!("{creds:?}").contains("secret-value"));
    }
}

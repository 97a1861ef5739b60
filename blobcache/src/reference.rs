//! Image references (`host[:port]/repo[:tag][@digest]`) as users type them.
//!
//! The registry host is always explicit: Brisk does not guess a default registry, so a
//! reference never silently resolves to a host the user did not name.

use std::fmt;
use std::str::FromStr;

use crate::{Digest, Error, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// `host` or `host:port`.
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl Reference {
    /// The tag or digest to put in a manifest URL; a bare repository means `latest`.
    pub fn manifest_ref(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_owned(),
        }
    }

    /// Registries on loopback speak plain HTTP; everything else HTTPS unless told otherwise.
    pub fn is_loopback(&self) -> bool {
        let host = match self.registry.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => &self.registry,
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

impl FromStr for Reference {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason| Error::InvalidReference {
            reference: s.to_owned(),
            reason,
        };
        let (rest, digest) = match s.split_once('@') {
            Some((rest, d)) => (
                rest,
                Some(d.parse::<Digest>().map_err(|_| bad("bad digest"))?),
            ),
            None => (s, None),
        };
        let (registry, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("no registry host"))?;
        let looks_like_host =
            registry.contains('.') || registry.contains(':') || registry == "localhost";
        if !looks_like_host {
            return Err(bad(
                "the first component must be a registry host (host[:port])",
            ));
        }
        let (repository, tag) = match path.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo, Some(tag.to_owned())),
            _ => (path, None),
        };
        let repo_ok = !repository.is_empty()
            && repository.split('/').all(|c| {
                !c.is_empty()
                    && c.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
            });
        if !repo_ok {
            return Err(bad("repository must be lowercase path components"));
        }
        if let Some(t) = &tag {
            let tag_ok = !t.is_empty()
                && t.len() <= 128
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                && !t.starts_with(['.', '-']);
            if !tag_ok {
                return Err(bad("invalid tag"));
            }
        }
        Ok(Self {
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            tag,
            digest,
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_host_port_repo_tag_and_digest() {
        let d = Digest::sha256(b"x");
        let r: Reference = format!("127.0.0.1:5000/team/app:v1@{d}").parse().unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "team/app");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.digest, Some(d));
        assert_eq!(r.manifest_ref(), d.to_string());
        assert!(r.is_loopback());
        assert_eq!(r.to_string(), format!("127.0.0.1:5000/team/app:v1@{d}"));
    }

    #[test]
    fn bare_repository_means_latest_and_remote_hosts_are_not_loopback() {
        let r: Reference = "registry.example.com/app".parse().unwrap();
        assert_eq!(r.manifest_ref(), "latest");
        assert!(!r.is_loopback());
        assert!("localhost:5000/a:b"
            .parse::<Reference>()
            .unwrap()
            .is_loopback());
        assert!("[::1]:5000/a".parse::<Reference>().unwrap().is_loopback());
    }

    #[test]
    fn rejects_references_without_host_or_with_bad_parts() {
        for bad in [
            "app:latest",
            "library/app",
            "host.io/App",
            "host.io/app:",
            "host.io/app@sha256:12",
            "host.io/",
        ] {
            assert!(bad.parse::<Reference>().is_err(), "{bad} accepted");
        }
    }
}

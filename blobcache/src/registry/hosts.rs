//! containerd's registry host configuration (`certs.d/<host>/hosts.toml`): the mirrors Brisk
//! reads through, in the order the file lists them, before the registry itself.
//!
//! Only what reads need is taken: `[host."<url>"]` entries whose capabilities include `pull`,
//! and whether they speak plain HTTP. TLS settings (`ca`, `client`, `skip_verify`) are not
//! read; such a mirror fails and the next source is used.

use std::collections::HashMap;
use std::path::Path;

use super::RegistryError;
use crate::Result;

/// Mirrors by registry host, and the mirror hosts reached over plain HTTP.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Mirrors {
    pub by_registry: HashMap<String, Vec<String>>,
    pub plain_http: Vec<String>,
}

/// Reads every `<dir>/<host>/hosts.toml`. A missing directory means no mirrors.
pub fn load(dir: &Path) -> Result<Mirrors> {
    let mut out = Mirrors::default();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(out);
    };
    for entry in entries.flatten() {
        let file = entry.path().join("hosts.toml");
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let Some(registry) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let table: toml::Table =
            toml::from_str(&text).map_err(|source| RegistryError::HostsFile {
                path: file.display().to_string(),
                source,
            })?;
        let Some(hosts) = table.get("host").and_then(|h| h.as_table()) else {
            continue;
        };
        for (url, settings) in hosts {
            let pulls = settings
                .get("capabilities")
                .and_then(|c| c.as_array())
                .is_none_or(|caps| caps.iter().any(|c| c.as_str() == Some("pull")));
            if !pulls {
                continue;
            }
            let (scheme, rest) = url.split_once("://").unwrap_or(("https", url));
            let host = rest.split('/').next().unwrap_or_default().to_owned();
            if host.is_empty() {
                continue;
            }
            if scheme == "http" {
                out.plain_http.push(host.clone());
            }
            out.by_registry
                .entry(registry.clone())
                .or_default()
                .push(host);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pull_mirrors_in_file_order() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("registry.example.com");
        std::fs::create_dir_all(&host).unwrap();
        std::fs::write(
            host.join("hosts.toml"),
            r#"server = "https://registry.example.com"

[host."http://mirror-b:5000"]
  capabilities = ["pull", "resolve"]

[host."https://mirror-a.example.com/v2/prefix"]

[host."https://push-only.example.com"]
  capabilities = ["push"]
"#,
        )
        .unwrap();
        let m = load(dir.path()).unwrap();
        assert_eq!(
            m.by_registry["registry.example.com"],
            ["mirror-b:5000", "mirror-a.example.com"]
        );
        assert_eq!(m.plain_http, ["mirror-b:5000"]);
        assert_eq!(
            load(&dir.path().join("missing")).unwrap(),
            Mirrors::default()
        );
    }
}

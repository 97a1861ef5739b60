//! Tar entry names to layer paths: the one place that decides what a safe name is.

use super::{MAX_NAME_LEN, MAX_PATH_DEPTH, MAX_PATH_LEN};
use crate::error::short;
use crate::toc::TocError;
use crate::{Error, Limit, Result};

/// Normalizes a tar entry name to a path relative to the layer root: a leading `/` is stripped
/// (as tar does), `.` and empty components are dropped, and a `..` component is an error
/// because it would let the entry land outside the root. The root itself is `""`.
///
/// The normalized path is bounded (`MAX_PATH_LEN` bytes, `MAX_PATH_DEPTH` components, each at
/// most `MAX_NAME_LEN` bytes), so nothing that walks a layer's tree can be made to recurse or
/// allocate without bound by one entry. It is measured in one pass before it is built.
pub fn normalize_name(name: &str) -> Result<String> {
    let what = || format!("Path {:?}", short(name));
    let (mut depth, mut len) = (0usize, 0usize);
    for part in components(name) {
        if part == ".." {
            return Err(Error::Toc(TocError::EscapingPath(name.to_owned())));
        }
        Error::check_limit(
            what,
            Limit::NameLength,
            part.len() as u64,
            MAX_NAME_LEN as u64,
        )?;
        len += part.len() + usize::from(depth > 0);
        depth += 1;
    }
    Error::check_limit(what, Limit::PathDepth, depth as u64, MAX_PATH_DEPTH as u64)?;
    Error::check_limit(what, Limit::PathLength, len as u64, MAX_PATH_LEN as u64)?;
    let mut out = String::with_capacity(len);
    for part in components(name) {
        if !out.is_empty() {
            out.push('/');
        }
        out.push_str(part);
    }
    Ok(out)
}

/// The components that make up the normalized path (`..` included, for the caller to refuse).
fn components(name: &str) -> impl Iterator<Item = &str> {
    name.split('/').filter(|part| !matches!(*part, "" | "."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_leading_slash_dot_and_trailing_slash() {
        assert_eq!(normalize_name("/usr/bin/").unwrap(), "usr/bin");
        assert_eq!(normalize_name("./etc//passwd").unwrap(), "etc/passwd");
        assert_eq!(normalize_name("./").unwrap(), "");
        assert_eq!(normalize_name("a/./b").unwrap(), "a/b");
        assert_eq!(normalize_name("unicodé/名前").unwrap(), "unicodé/名前");
    }

    #[test]
    fn dotdot_anywhere_is_an_escape() {
        for bad in ["../etc/passwd", "a/../../b", "a/..", "/..", "a/../b"] {
            assert!(
                matches!(
                    normalize_name(bad),
                    Err(Error::Toc(TocError::EscapingPath(_)))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn names_that_only_look_like_dotdot_are_fine() {
        assert_eq!(normalize_name("a/..b/...").unwrap(), "a/..b/...");
    }

    #[test]
    fn paths_are_bounded_in_length_depth_and_component_length() {
        let limit = |name: &str| match normalize_name(name) {
            Err(Error::OverLimit {
                limit, value, max, ..
            }) => Some((limit, value, max)),
            _ => None,
        };
        // The 20,000-deep tree that overflowed the snapshotter's stack: a 40 KB name.
        let deep = "a/".repeat(20_000);
        assert_eq!(
            limit(&deep),
            Some((Limit::PathDepth, 20_000, MAX_PATH_DEPTH as u64))
        );
        let at_depth = vec!["a"; MAX_PATH_DEPTH].join("/");
        assert_eq!(normalize_name(&at_depth).unwrap(), at_depth);
        assert!(limit(&format!("{at_depth}/a")).is_some());

        let long_name = "n".repeat(MAX_NAME_LEN + 1);
        assert_eq!(
            limit(&format!("usr/{long_name}")),
            Some((
                Limit::NameLength,
                MAX_NAME_LEN as u64 + 1,
                MAX_NAME_LEN as u64
            ))
        );
        assert!(normalize_name(&"n".repeat(MAX_NAME_LEN)).is_ok());

        // 17 components of 255 bytes: shallow, every name fine, but 4351 bytes in all.
        let wide = vec!["w".repeat(MAX_NAME_LEN); 17].join("/");
        assert_eq!(
            limit(&wide),
            Some((Limit::PathLength, wide.len() as u64, MAX_PATH_LEN as u64))
        );
        // Dropped components do not count: only the normalized path is measured.
        let padded = format!("{}{}", "./".repeat(5_000), "etc/passwd");
        assert_eq!(normalize_name(&padded).unwrap(), "etc/passwd");

        let err = normalize_name(&deep).unwrap_err().to_string();
        assert!(err.starts_with("Path \"a/a/a/"), "{err}");
        assert!(
            err.ends_with("path depth 20000 is over the limit of 256"),
            "{err}"
        );
        assert!(err.len() < 200, "the message names the path, cut short");
    }
}

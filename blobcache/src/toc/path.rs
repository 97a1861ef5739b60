//! Tar entry names to layer paths: the one place that decides what a safe name is.

use crate::{Error, Result};

/// Normalizes a tar entry name to a path relative to the layer root: a leading `/` is stripped
/// (as tar does), `.` and empty components are dropped, and a `..` component is an error
/// because it would let the entry land outside the root. The root itself is `""`.
pub fn normalize_name(name: &str) -> Result<String> {
    let mut out = String::with_capacity(name.len());
    for part in name.split('/') {
        match part {
            "" | "." => continue,
            ".." => return Err(Error::EscapingPath(name.to_owned())),
            _ => {
                if !out.is_empty() {
                    out.push('/');
                }
                out.push_str(part);
            }
        }
    }
    Ok(out)
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
                matches!(normalize_name(bad), Err(Error::EscapingPath(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn names_that_only_look_like_dotdot_are_fine() {
        assert_eq!(normalize_name("a/..b/...").unwrap(), "a/..b/...");
    }
}

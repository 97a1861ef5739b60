//! containerd's filter syntax for Walk (List): `name==x`, `parent!=y`, `kind==committed`,
//! `labels."k"==v`, `labels.k` (present), `~=` for a regular expression. Commas inside one
//! filter AND its terms; several filters OR together.

use crate::meta::{Kind, Snapshot};
use crate::{Error, Result};

#[derive(Debug)]
enum Op {
    Present,
    Eq(String),
    Ne(String),
    Matches(regex::Regex),
}

#[derive(Debug)]
struct Term {
    field: Vec<String>,
    op: Op,
}

/// A parsed list of filters; empty matches everything.
#[derive(Debug, Default)]
pub struct Filters(Vec<Vec<Term>>);

impl Filters {
    pub fn parse(filters: &[String]) -> Result<Self> {
        let mut out = Vec::new();
        for f in filters.iter().filter(|f| !f.trim().is_empty()) {
            out.push(
                split_terms(f)?
                    .iter()
                    .map(|t| parse_term(t))
                    .collect::<Result<Vec<_>>>()?,
            );
        }
        Ok(Self(out))
    }

    pub fn matches(&self, s: &Snapshot) -> bool {
        self.0.is_empty()
            || self
                .0
                .iter()
                .any(|terms| terms.iter().all(|t| t.matches(s)))
    }
}

impl Term {
    fn matches(&self, s: &Snapshot) -> bool {
        let kind = match s.kind {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        };
        let value: Option<&str> = match self
            .field
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice()
        {
            ["name"] => Some(&s.key),
            ["parent"] => Some(&s.parent),
            ["kind"] => Some(kind),
            ["labels", k] => s.labels.get(*k).map(String::as_str),
            _ => None,
        };
        match (&self.op, value) {
            (Op::Present, v) => v.is_some_and(|v| !v.is_empty()),
            (Op::Eq(want), Some(v)) => v == want,
            (Op::Ne(want), v) => v != Some(want.as_str()),
            (Op::Matches(re), Some(v)) => re.is_match(v),
            _ => false,
        }
    }
}

/// Splits on commas that are outside quotes.
fn split_terms(s: &str) -> Result<Vec<String>> {
    let mut out = vec![String::new()];
    let mut quoted = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                out.last_mut().expect("never empty").push(c);
            }
            '\\' if quoted => {
                let last = out.last_mut().expect("never empty");
                last.push(c);
                last.extend(chars.next());
            }
            ',' if !quoted => out.push(String::new()),
            c => out.last_mut().expect("never empty").push(c),
        }
    }
    if quoted {
        return Err(Error::InvalidArgument(format!(
            "unterminated quote in filter {s:?}"
        )));
    }
    Ok(out
        .into_iter()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .collect())
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    if s.len() >= 2 && s.starts_with('"') && s.ends_with('"') {
        s[1..s.len() - 1]
            .replace("\\\"", "\"")
            .replace("\\\\", "\\")
    } else {
        s.to_owned()
    }
}

fn parse_term(t: &str) -> Result<Term> {
    // The operator is the first of ==, !=, ~= outside quotes.
    let mut quoted = false;
    let bytes = t.as_bytes();
    let mut split = None;
    for i in 0..bytes.len() {
        match bytes[i] {
            b'"' => quoted = !quoted,
            b'=' | b'!' | b'~' if !quoted && bytes.get(i + 1) == Some(&b'=') => {
                split = Some(i);
                break;
            }
            _ => {}
        }
    }
    let (field, op) = match split {
        None => (t, Op::Present),
        Some(i) => {
            let value = unquote(&t[i + 2..]);
            let op = match bytes[i] {
                b'=' => Op::Eq(value),
                b'!' => Op::Ne(value),
                _ => Op::Matches(
                    regex::Regex::new(&value)
                        .map_err(|e| Error::InvalidArgument(format!("bad regex in filter: {e}")))?,
                ),
            };
            (&t[..i], op)
        }
    };
    let field = field_path(field.trim())?;
    Ok(Term { field, op })
}

/// `labels."a.b"` → ["labels", "a.b"]; `labels.k` → ["labels", "k"].
fn field_path(f: &str) -> Result<Vec<String>> {
    let bad = || Error::InvalidArgument(format!("unsupported filter field {f:?}"));
    match f.split_once('.') {
        None if matches!(f, "name" | "parent" | "kind") => Ok(vec![f.to_owned()]),
        Some(("labels", rest)) if !rest.is_empty() => Ok(vec!["labels".into(), unquote(rest)]),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn snap(key: &str, parent: &str, kind: Kind, labels: &[(&str, &str)]) -> Snapshot {
        Snapshot {
            id: 1,
            key: key.into(),
            kind,
            parent: parent.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            created: (0, 0),
            updated: (0, 0),
            usage: None,
            remote: None,
        }
    }

    fn f(filters: &[&str]) -> Filters {
        Filters::parse(&filters.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn fields_operators_and_boolean_structure() {
        let s = snap(
            "sha256:abc",
            "p",
            Kind::Committed,
            &[("containerd.io/snapshot.ref", "sha256:abc"), ("x", "1")],
        );
        assert!(f(&[]).matches(&s));
        assert!(f(&["name==sha256:abc"]).matches(&s));
        assert!(f(&["kind==committed,parent==p"]).matches(&s));
        assert!(!f(&["kind==committed,parent==q"]).matches(&s));
        assert!(f(&["kind==active", "parent==p"]).matches(&s), "filters OR");
        assert!(f(&[r#"labels."containerd.io/snapshot.ref"==sha256:abc"#]).matches(&s));
        assert!(f(&["labels.x"]).matches(&s));
        assert!(!f(&["labels.y"]).matches(&s));
        assert!(f(&["labels.x!=2"]).matches(&s));
        assert!(f(&["name~=^sha256:a"]).matches(&s));
        assert!(f(&[r#"labels."a,b"!="1,2""#]).matches(&s));
    }

    #[test]
    fn bad_filters_are_invalid_arguments() {
        for bad in ["nosuchfield==1", r#"labels."open==1"#, "name~=(", "labels."] {
            assert!(Filters::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
    }
}

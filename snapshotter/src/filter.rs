//! containerd's filter language for Walk (List), parsed and matched as containerd's
//! `filters` package does: `name==x`, `parent!=y`, `kind==committed`, `labels."k"==v`,
//! `labels.k` (present), `~=` for a regular expression; commas inside one filter AND its
//! selectors, several filters OR together, and an empty filter matches everything.
//!
//! The grammar's corners are containerd's too, because a client may rely on them: a value
//! starting with `/`, `|` or `"` is quoted (so `name==/a` is an error, `name=="/a"` is not),
//! quotes are Go string literals, `!=` and `~=` see an absent field as the empty string, an
//! unknown field is absent rather than an error, and a regular expression that does not
//! compile matches nothing. It does not index anything: every snapshot is matched in turn.

use crate::error::Refusal;
use crate::meta::{Kind, Snapshot};
use crate::Result;

#[derive(Debug)]
enum Op {
    Present,
    Eq(Vec<u8>),
    Ne(Vec<u8>),
    /// `None`: the expression does not compile, and matches nothing (containerd logs it at
    /// match time and answers false).
    Matches(Option<regex::bytes::Regex>),
}

#[derive(Debug)]
struct Selector {
    field: Vec<String>,
    op: Op,
}

/// A parsed list of filters; empty matches everything.
#[derive(Debug, Default)]
pub struct Filters(Vec<Vec<Selector>>);

impl Filters {
    pub fn parse(filters: &[String]) -> Result<Self> {
        let mut out = Vec::new();
        for f in filters {
            out.push(Parser::new(f).filter().map_err(Refusal::Filter)?);
        }
        Ok(Self(out))
    }

    pub fn matches(&self, s: &Snapshot) -> bool {
        self.0.is_empty() || self.0.iter().any(|all| all.iter().all(|t| t.matches(s)))
    }
}

/// The value of `field` for `s`, as containerd's snapshot adaptor gives it: `None` is absent.
fn field<'a>(s: &'a Snapshot, field: &[String]) -> Option<&'a str> {
    match field.first().map(String::as_str) {
        Some("kind") => Some(match s.kind {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }),
        Some("name") => Some(&s.key),
        Some("parent") => Some(&s.parent),
        Some("labels") => s.labels.get(&field[1..].join(".")).map(String::as_str),
        _ => None,
    }
}

impl Selector {
    fn matches(&self, s: &Snapshot) -> bool {
        let value = field(s, &self.field);
        let text = value.unwrap_or("").as_bytes();
        match &self.op {
            Op::Present => value.is_some(),
            Op::Eq(want) => value.is_some() && text == want.as_slice(),
            Op::Ne(want) => text != want.as_slice(),
            Op::Matches(re) => re.as_ref().is_some_and(|re| re.is_match(text)),
        }
    }
}

#[derive(Debug, PartialEq)]
enum Token {
    Eof,
    /// The literal with its quotes.
    Quoted(String),
    Value(String),
    Field(String),
    Separator,
    Operator(String),
    /// The scanner's first error.
    Illegal(String),
    Other,
}

fn is_quote(c: char) -> bool {
    matches!(c, '/' | '|' | '"')
}

fn is_field(c: char) -> bool {
    c == '_' || c.is_ascii_alphanumeric()
}

fn is_value(c: char) -> bool {
    c != ',' && !c.is_whitespace() && !c.is_control()
}

/// containerd's scanner and parser, one selector list per filter. Positions are byte
/// offsets, for error messages worded as containerd words them.
struct Parser<'a> {
    input: &'a str,
    /// Start of the next unread character.
    at: usize,
    /// Set after an operator: the next token is a value, whatever it looks like.
    value: bool,
    err: Option<String>,
}

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Self {
        Self {
            input,
            at: 0,
            value: false,
            err: None,
        }
    }

    fn peek(&self) -> Option<char> {
        self.input[self.at..].chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.at += c.len_utf8();
        Some(c)
    }

    fn fail(&mut self, msg: &str) {
        self.err.get_or_insert_with(|| msg.to_owned());
    }

    /// The next token and where it starts.
    fn scan(&mut self) -> (usize, Token) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.bump();
        }
        let start = self.at;
        let Some(c) = self.bump() else {
            return (start, Token::Eof);
        };
        let text = |p: &Self| p.input[start..p.at].to_owned();
        if c == '\0' {
            self.fail("unexpected null");
            return (start, Token::Illegal(self.err.clone().unwrap_or_default()));
        }
        if is_quote(c) {
            return if self.quoted(c) {
                (start, Token::Quoted(text(self)))
            } else {
                (start, Token::Illegal(self.err.clone().unwrap_or_default()))
            };
        }
        if matches!(c, ',' | '.') {
            self.value = false;
            return (start, Token::Separator);
        }
        if matches!(c, '=' | '!' | '~') {
            while self.peek().is_some_and(|c| matches!(c, '=' | '!' | '~')) {
                self.bump();
            }
            self.value = true;
            return (start, Token::Operator(text(self)));
        }
        if self.value {
            while self.peek().is_some_and(is_value) {
                self.bump();
            }
            self.value = false;
            return (start, Token::Value(text(self)));
        }
        if is_field(c) {
            while self.peek().is_some_and(is_field) {
                self.bump();
            }
            return (start, Token::Field(text(self)));
        }
        (start, Token::Other)
    }

    /// Reads a quoted literal up to its closing `quote`, checking its escapes.
    fn quoted(&mut self, quote: char) -> bool {
        let mut legal = true;
        let mut c = self.bump();
        while c != Some(quote) {
            match c {
                None | Some('\n') | Some('\0') => {
                    self.fail("quoted literal not terminated");
                    return false;
                }
                Some('\\') => {
                    let (next, ok) = self.escape(quote);
                    legal &= ok;
                    c = next;
                }
                Some(_) => c = self.bump(),
            }
        }
        legal
    }

    fn escape(&mut self, quote: char) -> (Option<char>, bool) {
        let c = self.bump();
        let digits = |p: &mut Self, first: Option<char>, base: u32, n: usize| {
            let mut c = first;
            for _ in 0..n {
                if !c.is_some_and(|c| c.is_digit(base)) {
                    p.fail("illegal numeric escape sequence");
                    return (c, false);
                }
                c = p.bump();
            }
            (c, true)
        };
        match c {
            Some(e) if "abfnrtv\\".contains(e) || e == quote => (self.bump(), true),
            Some('0'..='7') => digits(self, c, 8, 3),
            Some('x') => {
                let first = self.bump();
                digits(self, first, 16, 2)
            }
            Some('u') => {
                let first = self.bump();
                digits(self, first, 16, 4)
            }
            Some('U') => {
                let first = self.bump();
                digits(self, first, 16, 8)
            }
            _ => {
                self.fail("illegal escape sequence");
                (c, false)
            }
        }
    }

    /// containerd's parse error: the input with the offending character marked.
    fn error(&self, at: usize, msg: &str) -> String {
        match self.input[at..].chars().next() {
            Some(c) => format!(
                "[{} >|{}|< {}]: {msg}",
                &self.input[..at],
                c,
                &self.input[at + c.len_utf8()..]
            ),
            None => format!("[{}]: {msg}", self.input),
        }
    }

    fn filter(&mut self) -> std::result::Result<Vec<Selector>, String> {
        if self.input.is_empty() {
            return Ok(Vec::new());
        }
        let mut all = vec![self.selector()?];
        loop {
            match self.peek() {
                Some(',') => {
                    self.scan();
                    all.push(self.selector()?);
                }
                None => return Ok(all),
                Some(c) => return Err(self.error(self.at, &format!("unexpected input: {c}"))),
            }
        }
    }

    fn selector(&mut self) -> std::result::Result<Selector, String> {
        let field = self.fieldpath()?;
        if matches!(self.peek(), None | Some(',')) {
            return Ok(Selector {
                field,
                op: Op::Present,
            });
        }
        let (at, tok) = self.scan();
        let op = match tok {
            Token::Operator(op) if matches!(op.as_str(), "==" | "!=" | "~=") => op,
            Token::Operator(op) => {
                return Err(self.error(at, &format!("unsupported operator {op:?}")))
            }
            Token::Illegal(msg) => return Err(self.error(at, &msg)),
            _ => return Err(self.error(at, r#"expected an operator ("=="|"!="|"~=")"#)),
        };
        let (at, tok) = self.scan();
        let value = match tok {
            Token::Value(v) | Token::Field(v) => v.into_bytes(),
            Token::Quoted(q) => self.unquote(at, &q, op == "~=")?,
            Token::Illegal(msg) => return Err(self.error(at, &msg)),
            _ => return Err(self.error(at, "expected value or quoted")),
        };
        let op = match op.as_str() {
            "==" => Op::Eq(value),
            "!=" => Op::Ne(value),
            _ => Op::Matches(
                regex::bytes::Regex::new(&String::from_utf8_lossy(&value))
                    .inspect_err(|e| tracing::warn!(%e, "a Walk filter's regular expression does not compile; it matches nothing"))
                    .ok(),
            ),
        };
        Ok(Selector { field, op })
    }

    fn fieldpath(&mut self) -> std::result::Result<Vec<String>, String> {
        let mut path = vec![self.field()?];
        while self.peek() == Some('.') {
            self.scan();
            path.push(self.field()?);
        }
        Ok(path)
    }

    fn field(&mut self) -> std::result::Result<String, String> {
        let (at, tok) = self.scan();
        match tok {
            Token::Field(f) => Ok(f),
            Token::Quoted(q) => {
                let bytes = self.unquote(at, &q, false)?;
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Token::Illegal(msg) => Err(self.error(at, &msg)),
            _ => Err(self.error(at, "expected field or quoted")),
        }
    }

    fn unquote(&self, at: usize, q: &str, alt: bool) -> std::result::Result<Vec<u8>, String> {
        if !alt && !q.starts_with('"') {
            return Err(self.error(at, "invalid quote encountered"));
        }
        unquote(q).map_err(|()| self.error(at, "unquoting failed: quote syntax error"))
    }
}

/// A Go string literal quoted by `"`, `/` or `|` (containerd's `filters.unquote`): bytes,
/// since `\x` and octal escapes may make ones that are not UTF-8.
fn unquote(q: &str) -> std::result::Result<Vec<u8>, ()> {
    let quote = q.chars().next().ok_or(())?;
    if q.len() < 2 || !q.ends_with(quote) || !is_quote(quote) {
        return Err(());
    }
    let inner = &q[1..q.len() - 1];
    if inner.contains('\n') {
        return Err(());
    }
    let mut out = Vec::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == quote {
            return Err(());
        }
        if c != '\\' {
            let mut buf = [0; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        let e = match chars.next().ok_or(())? {
            'a' => 0x07,
            'b' => 0x08,
            'f' => 0x0c,
            'n' => b'\n',
            'r' => b'\r',
            't' => b'\t',
            'v' => 0x0b,
            '\\' => b'\\',
            'x' => u8::try_from(hex(&mut chars, 2)?).map_err(drop)?,
            u @ ('u' | 'U') => {
                let n = if u == 'u' { 4 } else { 8 };
                let c = char::from_u32(hex(&mut chars, n)?).ok_or(())?;
                let mut buf = [0; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                continue;
            }
            d @ '0'..='7' => {
                let mut v = d.to_digit(8).ok_or(())?;
                for _ in 0..2 {
                    v = v << 3 | chars.next().and_then(|c| c.to_digit(8)).ok_or(())?;
                }
                u8::try_from(v).map_err(drop)?
            }
            c if c == quote && matches!(c, '"' | '|' | '/') => c as u8,
            _ => return Err(()),
        };
        out.push(e);
    }
    Ok(out)
}

/// `n` hex digits from `chars`, as one number.
fn hex(chars: &mut std::str::Chars<'_>, n: usize) -> std::result::Result<u32, ()> {
    (0..n).try_fold(0u32, |v, _| {
        let d = chars.next().and_then(|c| c.to_digit(16)).ok_or(())?;
        Ok(v << 4 | d)
    })
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

    fn error(filter: &str) -> String {
        Filters::parse(&[filter.to_string()])
            .unwrap_err()
            .to_string()
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
        assert!(f(&[""]).matches(&s), "an empty filter matches everything");
        assert!(f(&["", "name==other"]).matches(&s));
        assert!(f(&["name==sha256:abc"]).matches(&s));
        assert!(f(&["kind==committed,parent==p"]).matches(&s));
        assert!(!f(&["kind==committed,parent==q"]).matches(&s));
        assert!(f(&["kind==active", "parent==p"]).matches(&s), "filters OR");
        assert!(f(&[r#"labels."containerd.io/snapshot.ref"==sha256:abc"#]).matches(&s));
        assert!(f(&["labels.x"]).matches(&s));
        assert!(!f(&["labels.y"]).matches(&s));
        assert!(f(&["labels.x!=2"]).matches(&s));
        assert!(f(&["name~=^sha256:a"]).matches(&s));
        assert!(
            f(&["name~=/^sha256:a/"]).matches(&s),
            "alternative quotes for ~="
        );
        assert!(f(&[r#"labels."a,b"!="1,2""#]).matches(&s));
        assert!(f(&[r#"name=="sha256:\x61bc""#]).matches(&s), "Go escapes");
        assert!(
            f(&["name == sha256:abc"]).matches(&s),
            "spaces around the operator"
        );
    }

    #[test]
    fn absent_fields_read_as_empty_for_ne_and_regex_as_containerd_does() {
        let s = snap("a", "", Kind::Active, &[("x", "1")]);
        // `parent` is always present, empty or not.
        assert!(f(&["parent"]).matches(&s));
        assert!(f(&["parent==\"\""]).matches(&s));
        assert!(
            !f(&["labels.y!=\"\""]).matches(&s),
            "absent is the empty string"
        );
        assert!(f(&["labels.y!=1"]).matches(&s));
        assert!(f(&["labels.y~=^$"]).matches(&s));
        assert!(
            !f(&["labels.y==\"\""]).matches(&s),
            "== needs the field present"
        );
        // Unknown fields are absent, not errors.
        assert!(!f(&["nosuchfield==1"]).matches(&s));
        assert!(f(&["nosuchfield!=1"]).matches(&s));
        // A regular expression that does not compile matches nothing.
        assert!(!f(&["name~=\"(\""]).matches(&s));
        assert!(!f(&["name~=(", "kind==view"]).matches(&s));
    }

    #[test]
    fn bad_filters_are_refused_in_containerds_words() {
        assert_eq!(
            error(r#"labels."open==1"#),
            r#"filters: parse error: [labels. >|"|< open==1]: quoted literal not terminated"#
        );
        assert_eq!(
            error("labels."),
            "filters: parse error: [labels.]: expected field or quoted"
        );
        assert_eq!(
            error("name==/a/b"),
            "filters: parse error: [name== >|/|< a/b]: invalid quote encountered"
        );
        assert_eq!(
            error("name=a"),
            r#"filters: parse error: [name >|=|< a]: unsupported operator "=""#
        );
        assert_eq!(
            error("name==a b"),
            "filters: parse error: [name==a >| |< b]: unexpected input:  "
        );
        assert_eq!(
            error("name==\"\\q\""),
            r#"filters: parse error: [name== >|"|< \q"]: illegal escape sequence"#
        );
        for bad in [
            "name~=",
            ",",
            "labels.\"x\"y",
            "kind==a,",
            "kind==a , name==b",
        ] {
            assert!(Filters::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
    }
}

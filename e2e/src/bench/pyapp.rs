//! The generated Python application of the `modules` workload: thousands of small modules in
//! service packages, deterministic for a seed, with their bytecode compiled in the image.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::Result;

use crate::cmd::run;

/// The Python application of `Generated::PythonApp` under `root/app`, then its bytecode,
/// compiled by the image's own python3 so that the `.pyc` files match its version.
pub fn write(root: &Path, packages: u32, modules: u32, seed: u64) -> Result<()> {
    eprintln!("images: writing {packages} x {modules} Python modules");
    let app = root.join("app");
    let mut names = Vec::new();
    for p in 0..packages {
        let package = package_name(p);
        let dir = app.join(&package);
        fs::create_dir_all(&dir)?;
        let mut init = format!(
            r#""""The {package} service: importing it loads all its modules."""

from . import (
"#
        );
        for m in 0..modules {
            let module = module_name(m);
            write_source(
                &dir.join(format!("{module}.py")),
                &python_module(seed, p, m),
            )?;
            let _ = writeln!(init, "    {module},");
        }
        init.push_str(")\n");
        write_source(&dir.join("__init__.py"), &init)?;
        names.push(package);
    }
    write_source(&app.join("main.py"), &python_main(&names))?;
    // A clean environment: SOURCE_DATE_EPOCH, say, would switch compileall to hash-checked
    // bytecode, which makes every start read each source too.
    run(Command::new("chroot")
        .arg(root)
        .args(["/usr/bin/python3", "-m", "compileall", "-q", "/app"])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"))?;
    Ok(())
}

/// Writes a Python source with a whole-second mtime. A `.pyc` records its source's mtime
/// truncated to the second, but umoci's tar rounds it to the nearest one, so a source written
/// in the second half of a second would look changed in the image: every start would
/// compile it again.
fn write_source(path: &Path, text: &str) -> Result<()> {
    // Fixed rather than now: the same recipe then gives the same tree.
    const MTIME: Duration = Duration::from_secs(1_700_000_000);
    let mut file = fs::File::create(path)?;
    file.write_all(text.as_bytes())?;
    file.set_modified(SystemTime::UNIX_EPOCH + MTIME)?;
    Ok(())
}

/// The service packages of a generated Python application.
const PACKAGE_NAMES: &[&str] = &[
    "accounts", "audit", "billing", "cache", "catalog", "checkout", "courier", "invoices",
    "ledger", "loyalty", "metrics", "notify", "orders", "payments", "pricing", "profiles",
    "quotas", "ratings", "refunds", "reports", "search", "sessions", "shipping", "stock",
    "tariffs", "tickets", "tokens", "vendors", "wallets", "webhooks",
];

/// What the modules of a package are about.
const NOUNS: &[&str] = &[
    "route", "rule", "quota", "limit", "rate", "batch", "cursor", "filter", "policy", "queue",
    "record", "schema", "shard", "signal", "slot", "span", "tag", "token", "window", "zone",
];

const WORDS: &[&str] = &[
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
    "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango",
];

const ROLES: &[&str] = &["handling", "bookkeeping", "checks", "helpers", "scoring"];

const CLASS_KINDS: &[&str] = &["Table", "Index", "Policy", "Entry", "Tracker", "Registry"];

/// The part every generated module has; `@name@` marks what `python_module` fills in.
const MODULE_BODY: &str = r#""""@Noun@ @role@ for the @package@ service (module @module@).

Keeps the @noun@ table, scores incoming @noun@s against it and hands
the result to the next stage. The module body does no I/O: it only
defines constants, helpers and the @Class@ class.
"""

import math

__all__ = ["@Class@", "score", "normalise", "backoff", "LIMITS", "DEFAULT"]

VERSION = (1, @v1@, @v2@)
TIMEOUT_SECONDS = @timeout@
LIMITS = {
    "requests": @requests@,
    "burst": @burst@,
    "retries": @retries@,
}
LABELS = (@labels@)
_WEIGHTS = (@weights@)


def score(values, weight=@weight@):
    """Weighted, decaying sum of `values`, capped at the request limit."""
    total = 0.0
    for i, value in enumerate(values):
        total += value * weight * _WEIGHTS[i % len(_WEIGHTS)] / (i + 1)
    return min(total, float(LIMITS["requests"]))


def normalise(name, prefix="@prefix@-"):
    """Lower-case `name`, drop `prefix` and collapse separators."""
    name = name.strip().lower()
    if name.startswith(prefix):
        name = name[len(prefix) :]
    return "-".join(part for part in name.replace("_", "-").split("-") if part)


def backoff(attempt, base=@base@, cap=TIMEOUT_SECONDS):
    """Seconds to wait before retry `attempt`, doubling; None once out of retries."""
    if attempt >= LIMITS["retries"]:
        return None
    return min(cap, base * math.pow(2, attempt))


class @Class@:
    """One @noun@: its name, weight and how often it was used."""

    __slots__ = ("name", "weight", "hits")

    def __init__(self, name, weight=@weight@):
        self.name = normalise(name)
        self.weight = weight
        self.hits = 0

    def hit(self, values=()):
        """Records one use; the score of `values` under this @noun@."""
        self.hits += 1
        return score(values, self.weight)

    def budget(self):
        """Requests left before the burst limit."""
        return max(0, LIMITS["burst"] - self.hits)

    def __repr__(self):
        return f"@Class@({self.name!r}, weight={self.weight}, hits={self.hits})"
"#;

/// Helpers a module may have besides its body, so that modules differ in size and shape.
const MODULE_EXTRAS: &[&str] = &[
    r#"

def select_@noun@s(items, limit=@n@):
    """The first `limit` of `items` whose normalised name is one of the labels."""
    picked = []
    for item in items:
        if normalise(str(item)) in LABELS:
            picked.append(item)
            if len(picked) >= limit:
                break
    return picked
"#,
    r#"

def group_@noun@s(rows):
    """Sums the values of `rows`, (name, value) pairs, by normalised name."""
    table = {}
    for name, value in rows:
        key = normalise(name)
        table[key] = table.get(key, 0) + value
    return table
"#,
    r#"

def @noun@_ratio(hits, total, places=@d@):
    """The share of `total` that `hits` is, rounded; 0.0 when there is no total."""
    if not total:
        return 0.0
    return round(hits / total, places)
"#,
    r#"

def moving_average(samples, size=@n@):
    """Average of `samples` over a sliding window of `size`."""
    out = []
    acc = 0.0
    for i, sample in enumerate(samples):
        acc += sample
        if i >= size:
            acc -= samples[i - size]
        out.append(acc / min(i + 1, size))
    return out
"#,
    r#"

def parse_@noun@s(text, sep="@sep@"):
    """Splits `text` into (name, weight) pairs; a missing weight is the default."""
    pairs = []
    for chunk in text.split(sep):
        name, _, weight = chunk.partition("=")
        if name.strip():
            pairs.append((normalise(name), float(weight or @weight@)))
    return pairs
"#,
    r#"

class @Class@Error(ValueError):
    """Raised when a @noun@ goes over its limit."""

    def __init__(self, name, limit=@n@):
        super().__init__(f"{name}: over the limit of {limit}")
        self.name = name
        self.limit = limit
"#,
];

fn package_name(p: u32) -> String {
    let n = PACKAGE_NAMES.len() as u32;
    let word = PACKAGE_NAMES[(p % n) as usize];
    if p < n {
        word.to_owned()
    } else {
        format!("{word}{}", p / n)
    }
}

fn module_name(m: u32) -> String {
    format!("{}_{m:03}", NOUNS[m as usize % NOUNS.len()])
}

/// Module `m` of package `p`, 2-4 KiB: `MODULE_BODY` and one to four `MODULE_EXTRAS`, with
/// names and constants drawn from a stream of its own.
fn python_module(seed: u64, p: u32, m: u32) -> String {
    let rng = &mut Rng::new(seed ^ (u64::from(p) << 32 | u64::from(m)));
    let (package, module) = (package_name(p), module_name(m));
    let noun = NOUNS[m as usize % NOUNS.len()];
    let capital = |w: &str| w[..1].to_uppercase() + &w[1..];
    let class = format!("{}{}", capital(noun), rng.pick(CLASS_KINDS));
    let labels: Vec<String> = (0..4).map(|_| format!("{:?}", rng.pick(WORDS))).collect();
    let weights: Vec<String> = (0..4)
        .map(|_| format!("{:.2}", rng.range(10, 200) as f64 / 100.0))
        .collect();
    let mut text = MODULE_BODY.to_owned();
    // A shuffle, so that a module never defines the same helper twice.
    let mut extras: Vec<usize> = (0..MODULE_EXTRAS.len()).collect();
    for i in (1..extras.len()).rev() {
        extras.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for &e in &extras[..rng.range(1, 4) as usize] {
        text.push_str(MODULE_EXTRAS[e]);
    }
    text.push_str("\n\nDEFAULT = @Class@(LABELS[0])\n");
    let fills = [
        ("@Noun@", capital(noun)),
        ("@noun@", noun.to_owned()),
        ("@Class@", class),
        ("@role@", rng.pick(ROLES).to_owned()),
        ("@package@", package.clone()),
        ("@module@", module),
        ("@prefix@", package),
        ("@v1@", rng.below(20).to_string()),
        ("@v2@", rng.below(10).to_string()),
        ("@timeout@", rng.range(5, 120).to_string()),
        ("@requests@", rng.range(100, 10_000).to_string()),
        ("@burst@", rng.range(10, 500).to_string()),
        ("@retries@", rng.range(1, 8).to_string()),
        ("@labels@", labels.join(", ")),
        ("@weights@", weights.join(", ")),
        (
            "@weight@",
            format!("{:.2}", rng.range(50, 150) as f64 / 100.0),
        ),
        ("@base@", format!("{:.2}", rng.range(5, 100) as f64 / 100.0)),
        ("@n@", rng.range(2, 64).to_string()),
        ("@d@", rng.range(1, 6).to_string()),
        ("@sep@", rng.pick(&[",", ";", "|"]).to_owned()),
    ];
    for (mark, value) in fills {
        text = text.replace(mark, &value);
    }
    text
}

/// The application's entry point. It counts what it imported rather than what it asked for,
/// so a package whose init missed modules shows.
fn python_main(packages: &[String]) -> String {
    let mut main = String::from(
        r#""""Starts the application: imports every service package, then says how many
modules it loaded."""

import importlib
import sys

PACKAGES = (
"#,
    );
    for p in packages {
        let _ = writeln!(main, "    {p:?},");
    }
    main.push_str(
        r#")

for name in PACKAGES:
    importlib.import_module(name)
loaded = sum(1 for name in list(sys.modules) if "." in name and name.split(".")[0] in PACKAGES)
print(f"ready {loaded}", flush=True)
"#,
    );
    main
}

/// splitmix64. A fixed generator of our own, so that the generated text never changes with a
/// dependency's version (rand's `StdRng` promises no stable stream).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A number in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    fn pick<'a>(&mut self, words: &[&'a str]) -> &'a str {
        words[self.below(words.len() as u64) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_modules_are_2_to_4_kib_and_the_same_each_time() {
        let mut sizes = Vec::new();
        for p in 0..30 {
            for m in 0..100 {
                let text = python_module(0x3000, p, m);
                assert_eq!(text, python_module(0x3000, p, m));
                assert!(!text.contains('@'), "an unfilled mark in:\n{text}");
                sizes.push(text.len());
            }
        }
        let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
        assert!(*min >= 2048 && *max <= 4096, "sizes {min}..={max}");
    }
}

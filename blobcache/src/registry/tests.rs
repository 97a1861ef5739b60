//! The client against registries that ask for too much, send too much or never stop.

use std::time::Duration;

use super::*;
use crate::test_util::{client, respond, Reply};

fn over<T: std::fmt::Debug>(result: Result<T>) -> (Limit, u64, u64) {
    match result {
        Err(Error::OverLimit {
            limit, value, max, ..
        }) => (limit, value, max),
        other => panic!("expected a limit error, got {other:?}"),
    }
}

fn reference(host: &str) -> Reference {
    format!("{host}/test/app:v1").parse().unwrap()
}

#[tokio::test]
async fn a_range_longer_than_any_caller_needs_is_refused_before_the_request() {
    let registry = respond(|_| Reply::Hang).await;
    let c = client(&registry.host, &[]);
    let blob = Digest::sha256(b"blob");
    let r = reference(&registry.host);
    // The range a TOC position claiming 2^62 bytes would have asked for.
    let huge = c.get_blob_range(&r, &blob, 8..8 + (1 << 62)).await;
    assert_eq!(over(huge), (Limit::RangeLength, 1 << 62, MAX_RANGE_BYTES));
    let just_over = c.get_blob_range(&r, &blob, 0..MAX_RANGE_BYTES + 1).await;
    let err = just_over.unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("Range 0..67108865 of blob {blob}: range length")),
        "{err}"
    );
    assert_eq!(registry.count(), 0, "nothing was asked of the registry");
}

#[tokio::test]
async fn a_registry_that_ignores_the_range_and_never_stops_is_cut_off() {
    let registry = respond(|_| Reply::Endless(7)).await;
    let c = client(&registry.host, &[]);
    let got = tokio::time::timeout(
        Duration::from_secs(10),
        c.get_blob_range(
            &reference(&registry.host),
            &Digest::sha256(b"b"),
            1000..2000,
        ),
    )
    .await
    .expect("the rest of an endless body is never waited for")
    .unwrap();
    assert_eq!(got.as_ref(), &[7u8; 1000][..]);
}

#[tokio::test]
async fn a_range_answer_longer_than_asked_is_cut_to_the_range() {
    let body: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    // A 206 that sends everything from the range's start to the blob's end.
    let registry = respond(move |req| {
        let (a, _) = req.range.unwrap();
        Reply::range_of(&body, Some((a, body.len() as u64 - 1)))
    })
    .await;
    let c = client(&registry.host, &[]);
    let got = c
        .get_blob_range(&reference(&registry.host), &Digest::sha256(b"b"), 100..200)
        .await
        .unwrap();
    assert_eq!(got.len(), 100);
    assert_eq!(got[0], 100);
}

#[tokio::test]
async fn manifest_bodies_are_refused_past_the_limit_whether_announced_or_not() {
    let endless = respond(|_| Reply::Endless(b' ')).await;
    let c = client(&endless.host, &[]);
    let (limit, value, max) = over(c.get_manifest(&reference(&endless.host)).await);
    assert_eq!(
        (limit, max),
        (Limit::ResponseSize, MAX_MANIFEST_SIZE as u64)
    );
    assert!(value > max && value <= max + (64 << 10), "{value}");

    let announced =
        respond(|_| Reply::Body(200, String::new(), vec![b' '; MAX_MANIFEST_SIZE + 1])).await;
    let c = client(&announced.host, &[]);
    assert_eq!(
        over(c.get_manifest(&reference(&announced.host)).await),
        (
            Limit::ResponseSize,
            MAX_MANIFEST_SIZE as u64 + 1,
            MAX_MANIFEST_SIZE as u64
        )
    );
}

#[tokio::test]
async fn a_token_response_past_the_limit_is_refused() {
    // The token endpoint never stops talking; the registry only ever asks for a token.
    let tokens = respond(|_| Reply::Endless(b'a')).await;
    let realm = format!("http://{}/token", tokens.host);
    let registry = respond(move |_| {
        Reply::Body(
            401,
            format!("www-authenticate: Bearer realm=\"{realm}\",service=\"x\"\r\n"),
            Vec::new(),
        )
    })
    .await;
    let c = client(&registry.host, &[]);
    let (limit, value, max) = over(c.get_manifest(&reference(&registry.host)).await);
    assert_eq!((limit, max), (Limit::ResponseSize, 1 << 20));
    assert!(value > max, "{value}");
    assert_eq!(tokens.count(), 1);
}

#[test]
fn reads_go_to_each_mirror_in_order_then_the_registry() {
    let c = client("registry.example", &["m1:5000", "m2"]);
    let r: Reference = "registry.example/app:v1".parse().unwrap();
    let hosts: Vec<String> = c.read_sources(&r).into_iter().map(|s| s.registry).collect();
    assert_eq!(hosts, ["m1:5000", "m2", "registry.example"]);
    let alone = c.read_sources(&"other.example/app:v1".parse().unwrap());
    assert_eq!(alone.len(), 1);
}

//! The client against registries that ask for too much, send too much or never stop.

use std::sync::Mutex;
use std::time::Duration;

use super::*;
use crate::registry::RegistryError;
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

/// Every `Authorization` header a responder was sent, in order (`None` for requests without).
type Seen = Arc<Mutex<Vec<Option<String>>>>;

fn basic_header(user: &str, password: &str) -> String {
    use base64::Engine as _;
    let pair = format!("{user}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

fn challenge(scheme: &str) -> Reply {
    Reply::Body(401, format!("www-authenticate: {scheme}\r\n"), Vec::new())
}

#[tokio::test]
async fn pull_credentials_go_only_to_their_registry_and_repository() {
    let mirror_seen: Seen = Arc::default();
    let seen = mirror_seen.clone();
    let mirror = respond(move |req| {
        seen.lock().unwrap().push(req.authorization.clone());
        challenge("Basic realm=\"m\"")
    })
    .await;
    let expected = basic_header("u", "secret");
    let registry = respond(move |req| match &req.authorization {
        Some(a) if *a == expected => Reply::Body(200, String::new(), b"{}".to_vec()),
        _ => challenge("Basic realm=\"r\""),
    })
    .await;
    let keychain = Arc::new(Keychain::new());
    let creds = Credentials::Basic {
        username: "u".into(),
        password: "secret".into(),
    };
    keychain.put(&registry.host, "test/app", creds).unwrap();
    let mirrors =
        std::collections::HashMap::from([(registry.host.clone(), vec![mirror.host.clone()])]);
    let c = RegistryClient::new(RegistryConfig {
        retries: 0,
        mirrors,
        ..RegistryConfig::default()
    })
    .unwrap()
    .with_keychain(keychain);
    // The mirror refuses, the registry takes the pull's credentials.
    c.get_manifest(&reference(&registry.host)).await.unwrap();
    assert!(
        !mirror_seen.lock().unwrap().is_empty(),
        "the mirror was asked first"
    );
    assert!(
        mirror_seen.lock().unwrap().iter().all(Option::is_none),
        "credentials went to the mirror: {:?}",
        mirror_seen.lock().unwrap()
    );
    // Another repository of the same registry does not get them.
    let other: Reference = format!("{}/test/other:v1", registry.host).parse().unwrap();
    assert!(matches!(
        c.get_manifest(&other).await,
        Err(Error::Registry(RegistryError::Auth { .. }))
    ));
}

#[tokio::test]
async fn a_redirect_to_another_host_carries_no_credentials() {
    let target_seen: Seen = Arc::default();
    let seen = target_seen.clone();
    let target = respond(move |req| {
        seen.lock().unwrap().push(req.authorization.clone());
        Reply::Body(200, String::new(), b"{}".to_vec())
    })
    .await;
    let location = format!("http://{}/elsewhere", target.host);
    let expected = basic_header("u", "secret");
    let registry = respond(move |req| match &req.authorization {
        Some(a) if *a == expected => {
            Reply::Body(307, format!("location: {location}\r\n"), Vec::new())
        }
        _ => challenge("Basic realm=\"r\""),
    })
    .await;
    let keychain = Arc::new(Keychain::new());
    let creds = Credentials::Basic {
        username: "u".into(),
        password: "secret".into(),
    };
    keychain.put(&registry.host, "test/app", creds).unwrap();
    let c = RegistryClient::new(RegistryConfig {
        retries: 0,
        ..RegistryConfig::default()
    })
    .unwrap()
    .with_keychain(keychain);
    c.get_manifest(&reference(&registry.host)).await.unwrap();
    assert_eq!(*target_seen.lock().unwrap(), vec![None]);
}

#[tokio::test]
async fn a_challenge_from_a_redirect_target_is_refused_and_gets_no_credentials() {
    // A token service the redirect target names: it must never hear from the client.
    let realm_seen: Seen = Arc::default();
    let seen = realm_seen.clone();
    let realm = respond(move |req| {
        seen.lock().unwrap().push(req.authorization.clone());
        Reply::Body(200, String::new(), b"{\"token\":\"stolen\"}".to_vec())
    })
    .await;
    let challenge_text = format!("Bearer realm=\"http://{}/token\",service=\"x\"", realm.host);
    let target = respond(move |_| challenge(&challenge_text)).await;
    let location = format!("http://{}/elsewhere", target.host);
    let expected = basic_header("u", "secret");
    // The first authenticated read is served; later ones, which carry the credentials
    // without a challenge, are redirected.
    let served = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let registry = respond(move |req| match &req.authorization {
        Some(a) if *a == expected && !served.swap(true, std::sync::atomic::Ordering::SeqCst) => {
            Reply::Body(200, String::new(), b"{}".to_vec())
        }
        Some(a) if *a == expected => {
            Reply::Body(307, format!("location: {location}\r\n"), Vec::new())
        }
        _ => challenge("Basic realm=\"r\""),
    })
    .await;
    let keychain = Arc::new(Keychain::new());
    let creds = Credentials::Basic {
        username: "u".into(),
        password: "secret".into(),
    };
    keychain.put(&registry.host, "test/app", creds).unwrap();
    let c = RegistryClient::new(RegistryConfig {
        retries: 0,
        ..RegistryConfig::default()
    })
    .unwrap()
    .with_keychain(keychain);
    c.get_manifest(&reference(&registry.host)).await.unwrap();
    let got = c.get_manifest(&reference(&registry.host)).await;
    assert!(
        matches!(got, Err(Error::Registry(RegistryError::Auth { .. }))),
        "{got:?}"
    );
    assert!(
        realm_seen.lock().unwrap().is_empty(),
        "the redirect target's token service was asked: {:?}",
        realm_seen.lock().unwrap()
    );
}

#[tokio::test]
async fn a_token_fetched_with_replaced_credentials_is_not_sent_again() {
    // The token service names the password it was given in the token.
    let tokens = respond(|req| {
        let token = match req.authorization.as_deref() {
            Some(a) if a == basic_header("u", "one") => "tok-one",
            Some(a) if a == basic_header("u", "two") => "tok-two",
            _ => return challenge("Basic realm=\"t\""),
        };
        Reply::Body(
            200,
            String::new(),
            format!("{{\"token\":\"{token}\"}}").into_bytes(),
        )
    })
    .await;
    let registry_seen: Seen = Arc::default();
    let seen = registry_seen.clone();
    let realm = format!("http://{}/token", tokens.host);
    // Both tokens stay good at the registry: only the client can stop using the old one.
    let registry = respond(move |req| {
        seen.lock().unwrap().push(req.authorization.clone());
        match req.authorization.as_deref() {
            Some("Bearer tok-one" | "Bearer tok-two") => {
                Reply::Body(200, String::new(), b"{}".to_vec())
            }
            _ => challenge(&format!("Bearer realm=\"{realm}\",service=\"s\"")),
        }
    })
    .await;
    let keychain = Arc::new(Keychain::new());
    let c = RegistryClient::new(RegistryConfig {
        retries: 0,
        ..RegistryConfig::default()
    })
    .unwrap()
    .with_keychain(keychain.clone());
    let basic = |p: &str| Credentials::Basic {
        username: "u".into(),
        password: p.into(),
    };
    let r = reference(&registry.host);
    keychain
        .put(&registry.host, "test/app", basic("one"))
        .unwrap();
    c.get_manifest(&r).await.unwrap();
    c.get_manifest(&r).await.unwrap();
    keychain
        .put(&registry.host, "test/app", basic("two"))
        .unwrap();
    c.get_manifest(&r).await.unwrap();
    let seen = registry_seen.lock().unwrap().clone();
    let last_with_one = seen
        .iter()
        .rposition(|a| a.as_deref() == Some("Bearer tok-one"))
        .unwrap();
    assert_eq!(seen.last().unwrap().as_deref(), Some("Bearer tok-two"));
    // The old token was used until the credentials were replaced, never after.
    assert_eq!(
        seen[last_with_one + 1..]
            .iter()
            .filter(|a| a.as_deref() == Some("Bearer tok-one"))
            .count(),
        0
    );
    assert_eq!(seen[last_with_one + 1], None, "{seen:?}");
}

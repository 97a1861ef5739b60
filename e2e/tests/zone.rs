//! Zone peers (L3) with real hosts: several `brisk-snapshotter`s, each on its own loopback
//! address, one registry behind a counting proxy. A zone reads each chunk from the registry
//! about once; a peer killed mid-stream or a peer that lies costs latency, never a wrong
//! byte; unauthenticated callers get nothing; members join and leave while reads go on.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use brisk_blobcache::zone::auth::{Verifier, ZoneKey, PROOF_HEADER};
use brisk_blobcache::zone::{gossip, Zone};
use brisk_e2e::zone::{
    free_addr, image_info, mount_image, write_token, zone_certificates, Host, ImageInfo,
};
use brisk_e2e::{
    assert_same_tree, brisk, sample_in_registry, snapshotter_gate, Fault, Injection, Proxy,
    RegisteredSample, Registry,
};
use brisk_proto::brisk::v1::fetch_reply::Event;
use brisk_proto::brisk::v1::peer_client::PeerClient;
use brisk_proto::brisk::v1::peer_server::{Peer, PeerServer};
use brisk_proto::brisk::v1::{
    Accepted, FetchReply, FetchRequest, HasReply, HasRequest, PeerTraceReply, PeerTraceRequest,
    Piece,
};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// Small chunks, so the sample has enough of them to spread over several homes.
const CHUNK_SIZE: &str = "32768";

fn enabled() -> bool {
    snapshotter_gate()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

/// The sample converted into a registry behind a counting proxy, and the zone's token.
struct Fixture {
    proxy: Proxy,
    _registry: Registry,
    image: ImageInfo,
    rootfs: PathBuf,
    token: PathBuf,
    /// Compressed bytes of the image's layers: one copy of everything.
    layer_bytes: u64,
    chunks: u64,
    tmp: TempDir,
}

impl Fixture {
    fn new(rt: &tokio::runtime::Runtime) -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let RegisteredSample {
            registry, rootfs, ..
        } = sample_in_registry(tmp.path(), true, &["--chunk-size", CHUNK_SIZE])?;
        let inspect: serde_json::Value = serde_json::from_str(&brisk(&[
            "inspect",
            "--json",
            &registry.image("sample:lazy"),
        ])?)?;
        let chunks = count_chunks(&inspect);
        let proxy = Proxy::start(&registry.addr())?;
        let image = rt.block_on(image_info(&proxy.image("sample:lazy")))?;
        let layer_bytes = layer_sizes(&inspect);
        let token = tmp.path().join("zone.token");
        write_token(&token)?;
        proxy.reset_counts();
        Ok(Self {
            proxy,
            _registry: registry,
            image,
            rootfs,
            token,
            layer_bytes,
            chunks,
            tmp,
        })
    }

    fn host(&self, name: &str, addr: SocketAddr, seeds: &[SocketAddr]) -> Result<Host> {
        Host::start(&self.tmp.path().join(name), addr, seeds, &self.token)
    }

    /// A host at every address, each with all of them as seeds.
    fn mesh(&self, addrs: &[SocketAddr]) -> Result<Vec<Host>> {
        addrs
            .iter()
            .enumerate()
            .map(|(i, a)| self.host(&format!("h{i}"), *a, addrs))
            .collect()
    }

    /// Mounts the image on each host (TOCs fetched, no file read yet); the mount points.
    async fn mount_on(&self, hosts: &[Host]) -> Result<Vec<PathBuf>> {
        let mut targets = Vec::new();
        for (i, h) in hosts.iter().enumerate() {
            let target = h.snapshotter.root.join("view");
            mount_image(
                &h.snapshotter.socket,
                &self.image,
                &target,
                &format!("v{i}"),
            )
            .await?;
            targets.push(target);
        }
        Ok(targets)
    }

    /// Mounts the image on `host` and checks every file against the source tree.
    async fn read_all(&self, host: &Host, view: String) -> Result<()> {
        let target = host.snapshotter.root.join(&view);
        mount_image(&host.snapshotter.socket, &self.image, &target, &view)
            .await
            .with_context(|| format!("host {}: {}", host.addr, host.snapshotter.log()))?;
        let rootfs = self.rootfs.clone();
        tokio::task::spawn_blocking(move || assert_same_tree(&rootfs, &target)).await??;
        Ok(())
    }
}

fn count_chunks(inspect: &serde_json::Value) -> u64 {
    let mut n = 0;
    walk(inspect, &mut |k, v| {
        if k == "chunks" {
            n += v.as_u64().unwrap_or(0);
        }
    });
    n
}

fn layer_sizes(inspect: &serde_json::Value) -> u64 {
    let mut n = 0;
    walk(inspect, &mut |k, v| {
        if k == "layers" {
            for l in v.as_array().into_iter().flatten() {
                n += l["size"].as_u64().unwrap_or(0);
            }
        }
    });
    n
}

fn walk(v: &serde_json::Value, f: &mut dyn FnMut(&str, &serde_json::Value)) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                f(k, x);
                walk(x, f);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, f)),
        _ => {}
    }
}

fn ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, n)
}

/// Free peer addresses for `n` hosts on 127.0.0.`first` and up.
fn addrs(first: u8, n: u8) -> Result<Vec<SocketAddr>> {
    (0..n).map(|i| free_addr(ip(first + i))).collect()
}

/// A request for `method` at the member `to`, stamped with `key`.
fn stamped<T: prost::Message>(
    key: &ZoneKey,
    to: SocketAddr,
    method: &str,
    message: T,
) -> Request<T> {
    let mut request = Request::new(message);
    key.sign(&mut request, method, to);
    request
}

/// A zone counter summed over `hosts`.
async fn zone_total(
    hosts: &[Host],
    f: fn(&brisk_proto::brisk::v1::ZoneStatus) -> u64,
) -> Result<u64> {
    let mut n = 0;
    for h in hosts {
        n += zone_counter(h, f).await?;
    }
    Ok(n)
}

/// Waits until every host sees all the others; how long it took.
async fn converge(hosts: &[&Host], within: Duration) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let mut done = true;
        for h in hosts {
            let want: Vec<String> = {
                let mut w: Vec<String> = hosts
                    .iter()
                    .filter(|o| o.addr != h.addr)
                    .map(|o| o.addr.to_string())
                    .collect();
                w.sort();
                w
            };
            if h.members().await? != want {
                done = false;
            }
        }
        if done {
            return Ok(started.elapsed());
        }
        ensure!(
            started.elapsed() < within,
            "membership did not converge in {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn zone_counter(
    host: &Host,
    f: fn(&brisk_proto::brisk::v1::ZoneStatus) -> u64,
) -> Result<u64> {
    Ok(host.status().await?.zone.as_ref().map_or(0, f))
}

#[test]
fn four_hosts_fetch_each_chunk_from_the_registry_about_once() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let rt = runtime();
    let fx = Fixture::new(&rt)?;
    let hosts = fx.mesh(&addrs(21, 4)?)?;
    rt.block_on(async {
        let took = converge(&hosts.iter().collect::<Vec<_>>(), Duration::from_secs(10)).await?;
        eprintln!("4 hosts converged in {took:?}");
        fx.proxy.reset_counts();
        let reads = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| fx.read_all(h, format!("view{i}")));
        // A deadlock between homes shows as a hang: bound it.
        let all = tokio::time::timeout(Duration::from_secs(120), futures::future::join_all(reads))
            .await
            .context("the hosts' reads did not finish in 120 s")?;
        for r in all {
            r?;
        }
        let counts = fx.proxy.counts();
        let from_peers = zone_total(&hosts, |z| z.chunks).await?;
        let failures = zone_total(&hosts, |z| z.failures).await?;
        eprintln!("peer requests that failed: {failures}");
        eprintln!(
            "zone of 4: registry served {} blob bytes in {} requests for {} layer bytes ({} chunks); {} chunks came from peers",
            counts.blob_bytes, counts.blob_requests, fx.layer_bytes, fx.chunks, from_peers
        );
        ensure!(from_peers > 0, "no host got a chunk from a peer");
        // Every host also reads each layer's TOC and footer itself: a few KiB per layer.
        ensure!(
            counts.blob_bytes as f64 <= fx.layer_bytes as f64 * 1.5,
            "the registry served {} bytes for {} bytes of layers: more than one copy",
            counts.blob_bytes,
            fx.layer_bytes
        );
        Ok(())
    })
}

#[test]
fn a_peer_killed_mid_stream_costs_latency_not_bytes() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let rt = runtime();
    let fx = Fixture::new(&rt)?;
    let mut hosts = fx.mesh(&addrs(31, 3)?)?;
    rt.block_on(async {
        converge(&hosts.iter().collect::<Vec<_>>(), Duration::from_secs(10)).await?;
        // Mount first (TOCs fetched), then make every chunk fetch slow, so streams to the
        // victim are open when it dies.
        let targets = fx.mount_on(&hosts[..2]).await?;
        fx.proxy
            .inject(Injection::blobs(Fault::Delay(Duration::from_millis(1500))));
        Ok::<_, anyhow::Error>(targets)
    })
    .and_then(|targets| {
        let readers: Vec<_> = targets
            .into_iter()
            .map(|t| {
                let rootfs = fx.rootfs.clone();
                std::thread::spawn(move || assert_same_tree(&rootfs, &t))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(800));
        hosts[2].snapshotter.kill9();
        for r in readers {
            r.join().expect("reader thread")?;
        }
        Ok(())
    })?;
    let failures = rt.block_on(zone_total(&hosts[..2], |z| z.failures))?;
    ensure!(
        failures > 0,
        "no reader saw the killed peer fail: the test did not exercise the failure"
    );
    drop(hosts);
    Ok(())
}

/// A zone member whose peer service answers every chunk with zeros; counts its lying answers.
struct Liar {
    verifier: Verifier,
    lies: Arc<AtomicU64>,
}

type Replies = Pin<Box<dyn futures::Stream<Item = Result<FetchReply, Status>> + Send>>;

impl Liar {
    fn proof<T: prost::Message>(
        &self,
        request: &Request<T>,
        method: &str,
    ) -> Result<String, Status> {
        self.verifier
            .authorize(request, method)
            .map_err(|_| Status::unauthenticated("no"))
    }
}

#[tonic::async_trait]
impl Peer for Liar {
    type FetchStream = Replies;

    async fn fetch(&self, request: Request<FetchRequest>) -> Result<Response<Replies>, Status> {
        let proof = self.proof(&request, "Fetch")?;
        let mut replies = vec![Ok(FetchReply {
            event: Some(Event::Accepted(Accepted {})),
        })];
        // A lying answer is caught at its first bad chunk and the rest of it is never read:
        // lies are counted per answer.
        if !request.get_ref().chunks.is_empty() {
            self.lies.fetch_add(1, Ordering::SeqCst);
        }
        for (i, c) in request.get_ref().chunks.iter().enumerate() {
            replies.push(Ok(FetchReply {
                event: Some(Event::Piece(Piece {
                    index: i as u32,
                    offset: 0,
                    data: vec![0u8; c.uncompressed_length as usize].into(),
                    last: true,
                })),
            }));
        }
        let mut response = Response::new(Box::pin(futures::stream::iter(replies)) as Replies);
        response
            .metadata_mut()
            .insert(PROOF_HEADER, proof.parse().expect("hex"));
        Ok(response)
    }

    async fn has(&self, _: Request<HasRequest>) -> Result<Response<HasReply>, Status> {
        Err(Status::unimplemented("liar"))
    }

    async fn get_trace(
        &self,
        _: Request<PeerTraceRequest>,
    ) -> Result<Response<PeerTraceReply>, Status> {
        Ok(Response::new(PeerTraceReply::default()))
    }
}

/// Runs a liar at `addr` that joins the zone through `seed`.
async fn start_liar(
    addr: SocketAddr,
    seed: SocketAddr,
    token: &Path,
    cancel: CancellationToken,
) -> Result<Arc<AtomicU64>> {
    let key = ZoneKey::from_file(token)?;
    let lies = Arc::new(AtomicU64::new(0));
    let liar = Liar {
        verifier: Verifier::new(key.clone(), addr),
        lies: lies.clone(),
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let stop = cancel.clone();
    tokio::spawn(async move {
        let incoming = tonic::codegen::tokio_stream::wrappers::TcpListenerStream::new(listener);
        let _ = tonic::transport::Server::builder()
            .add_service(PeerServer::new(liar))
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await;
    });
    gossip::start(Arc::new(Zone::new(addr)), key, vec![seed], cancel).await?;
    Ok(lies)
}

#[test]
fn a_lying_peer_is_caught_every_time_never_served_and_avoided() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let rt = runtime();
    let fx = Fixture::new(&rt)?;
    let a = free_addr(ip(41))?;
    let liar_addr = free_addr(ip(42))?;
    let host = fx.host("a", a, &[a, liar_addr])?;
    let cancel = CancellationToken::new();
    rt.block_on(async {
        let lies = start_liar(liar_addr, a, &fx.token, cancel.clone()).await?;
        let started = Instant::now();
        while host.members().await? != vec![liar_addr.to_string()] {
            ensure!(
                started.elapsed() < Duration::from_secs(10),
                "the liar did not join"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        fx.read_all(&host, "view".into()).await?;
        let lies = lies.load(Ordering::SeqCst);
        let caught = zone_counter(&host, |z| z.corrupt).await?;
        eprintln!(
            "liar gave {lies} lying answers for an image of {} chunks; {caught} caught",
            fx.chunks
        );
        ensure!(
            lies > 0,
            "the liar was never asked: the test did not exercise it"
        );
        ensure!(caught == lies, "{lies} lying answers but {caught} caught");
        // About half the chunks have the liar as their home; once caught it is passed over.
        ensure!(
            lies * 4 < fx.chunks,
            "the liar was asked for {lies} of {} chunks: it was not avoided",
            fx.chunks
        );
        Ok(())
    })?;
    cancel.cancel();
    Ok(())
}

#[test]
fn callers_without_the_zone_token_get_nothing() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let rt = runtime();
    let tmp = tempfile::tempdir()?;
    let token = tmp.path().join("zone.token");
    write_token(&token)?;
    let wrong = tmp.path().join("wrong.token");
    write_token(&wrong)?;
    let a = free_addr(ip(51))?;
    let host = Host::start(&tmp.path().join("a"), a, &[a], &token)?;
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{a}"))?
            .connect()
            .await?;
        let mut client = PeerClient::new(channel);
        let ask = |key: Option<&ZoneKey>| {
            let message = HasRequest {
                digests: vec![format!("sha256:{}", "0".repeat(64))],
            };
            match key {
                Some(k) => stamped(k, a, "Has", message),
                None => Request::new(message),
            }
        };
        let none = client.has(ask(None)).await;
        ensure!(
            matches!(&none, Err(s) if s.code() == tonic::Code::Unauthenticated),
            "no credentials: {none:?}"
        );
        let other = ZoneKey::from_file(&wrong)?;
        let bad = client.has(ask(Some(&other))).await;
        ensure!(
            matches!(&bad, Err(s) if s.code() == tonic::Code::Unauthenticated),
            "wrong token: {bad:?}"
        );
        let key = ZoneKey::from_file(&token)?;
        let good = client.has(ask(Some(&key))).await?;
        ensure!(good.get_ref().present == vec![false]);
        let refused = client
            .fetch(stamped(&other, a, "Fetch", FetchRequest::default()))
            .await;
        ensure!(
            matches!(&refused, Err(s) if s.code() == tonic::Code::Unauthenticated),
            "fetch with the wrong token: {:?}",
            refused.map(|_| ())
        );

        // Gossip sealed with another token is dropped; with the right one it joins.
        let cancel = CancellationToken::new();
        let outsider = free_addr(ip(52))?;
        gossip::start(
            Arc::new(Zone::new(outsider)),
            other,
            vec![a],
            cancel.clone(),
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        ensure!(
            host.members().await?.is_empty(),
            "an outsider joined the zone"
        );
        let insider = free_addr(ip(53))?;
        gossip::start(Arc::new(Zone::new(insider)), key, vec![a], cancel.clone()).await?;
        let started = Instant::now();
        while host.members().await? != vec![insider.to_string()] {
            ensure!(
                started.elapsed() < Duration::from_secs(10),
                "a member with the token did not join"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        cancel.cancel();
        Ok(())
    })
}

#[test]
fn members_join_and_leave_while_reads_keep_working() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let rt = runtime();
    let fx = Fixture::new(&rt)?;
    let addrs = addrs(61, 4)?;
    // Only the first host is a seed; a seed listed before it starts is not fatal.
    let mut hosts: Vec<Host> = Vec::new();
    for (i, a) in addrs.iter().take(3).enumerate() {
        hosts.push(fx.host(&format!("h{i}"), *a, &[addrs[0], addrs[3]])?);
    }
    rt.block_on(async {
        let took = converge(&hosts.iter().collect::<Vec<_>>(), Duration::from_secs(10)).await?;
        eprintln!("3 hosts converged in {took:?}");
        Ok::<_, anyhow::Error>(())
    })?;
    hosts.push(fx.host("h3", addrs[3], &[addrs[1]])?);
    rt.block_on(async {
        let took = converge(&hosts.iter().collect::<Vec<_>>(), Duration::from_secs(10)).await?;
        eprintln!("a fourth host joined in {took:?}");
        fx.read_all(&hosts[3], "view".into()).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    // A polite leave (SIGTERM) and a crash (SIGKILL): both are noticed.
    hosts[3].snapshotter.terminate()?;
    hosts[2].snapshotter.kill9();
    rt.block_on(async {
        let left = [&hosts[0], &hosts[1]];
        let took = converge(&left, Duration::from_secs(30)).await?;
        eprintln!("two departures noticed in {took:?}");
        fx.read_all(&hosts[0], "view2".into()).await?;
        fx.read_all(&hosts[1], "view2".into()).await?;
        Ok(())
    })
}

#[test]
fn a_host_seeing_an_image_first_gets_its_start_up_trace_from_the_zone() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let rt = runtime();
    let fx = Fixture::new(&rt)?;
    let a = free_addr(ip(71))?;
    let b = free_addr(ip(72))?;
    let first = fx.host("a", a, &[a, b])?;
    rt.block_on(async {
        // The first start anywhere in the zone is recorded on its host.
        fx.read_all(&first, "view".into()).await?;
        let started = Instant::now();
        while first.traces().await? != vec![fx.image.manifest.clone()] {
            ensure!(
                started.elapsed() < Duration::from_secs(30),
                "host a recorded no trace"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    let second = fx.host("b", b, &[a, b])?;
    rt.block_on(async {
        converge(&[&first, &second], Duration::from_secs(10)).await?;
        ensure!(second.traces().await?.is_empty());
        fx.read_all(&second, "view".into()).await?;
        ensure!(
            second.traces().await? == vec![fx.image.manifest.clone()],
            "host b holds no trace after its first start"
        );
        let status = second.status().await?;
        ensure!(
            status.prefetches_started == 1 && status.recordings == 0,
            "host b should prefetch from a's trace and record none: {status:?}"
        );
        ensure!(
            second
                .snapshotter
                .log()
                .contains("trace fetched from a zone peer"),
            "host b's trace did not come from the zone"
        );
        Ok(())
    })
}

#[test]
fn a_zone_with_mutual_tls_serves_members_and_refuses_strangers() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let rt = runtime();
    let fx = Fixture::new(&rt)?;
    let addrs = addrs(81, 2)?;
    let tls = zone_certificates(&fx.tmp.path().join("pki"), &addrs)?;
    let hosts: Vec<Host> = addrs
        .iter()
        .zip(&tls)
        .enumerate()
        .map(|(i, (a, t))| {
            Host::start_with(
                &fx.tmp.path().join(format!("h{i}")),
                *a,
                &addrs,
                &fx.token,
                t,
            )
        })
        .collect::<Result<_>>()?;
    rt.block_on(async {
        converge(&hosts.iter().collect::<Vec<_>>(), Duration::from_secs(10)).await?;
        let reads = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| fx.read_all(h, format!("view{i}")));
        for r in futures::future::join_all(reads).await {
            r?;
        }
        let from_peers = zone_total(&hosts, |z| z.chunks).await?;
        ensure!(
            zone_total(&hosts, |z| z.failures).await? == 0,
            "a TLS request failed"
        );
        ensure!(from_peers > 0, "no chunk crossed the zone over TLS");

        // With the token but without a certificate, in the clear or over TLS, nothing.
        let key = ZoneKey::from_file(&fx.token)?;
        let has = |k: &ZoneKey| stamped(k, addrs[0], "Has", HasRequest::default());
        let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", addrs[0]))?
            .connect()
            .await;
        if let Ok(channel) = plain {
            let answer = PeerClient::new(channel).has(has(&key)).await;
            ensure!(answer.is_err(), "a plaintext caller was answered");
        }
        let ca = std::fs::read(fx.tmp.path().join("pki/ca.pem"))?;
        let no_cert = tonic::transport::Endpoint::from_shared(format!("https://{}", addrs[0]))?
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(&ca))
                    .domain_name(addrs[0].ip().to_string()),
            )?
            .connect()
            .await;
        if let Ok(channel) = no_cert {
            let answer = PeerClient::new(channel).has(has(&key)).await;
            ensure!(
                answer.is_err(),
                "a caller without a client certificate was answered"
            );
        }
        Ok(())
    })
}

#[test]
fn a_home_waiting_on_a_slow_registry_is_waited_for_not_bypassed() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let rt = runtime();
    let fx = Fixture::new(&rt)?;
    let hosts = fx.mesh(&addrs(91, 2)?)?;
    let targets = rt.block_on(async {
        converge(&hosts.iter().collect::<Vec<_>>(), Duration::from_secs(10)).await?;
        fx.mount_on(&hosts).await
    })?;
    // Longer than a silent peer is given (5 s): only the home's progress keeps the other
    // host waiting instead of going to the registry itself.
    fx.proxy.reset_counts();
    fx.proxy
        .inject(Injection::blobs(Fault::Delay(Duration::from_secs(7))));
    let started = Instant::now();
    let readers: Vec<_> = targets
        .into_iter()
        .map(|t| std::thread::spawn(move || std::fs::read(t.join("etc/group"))))
        .collect();
    for r in readers {
        let got = r.join().expect("reader thread")?;
        ensure!(
            got == std::fs::read(fx.rootfs.join("etc/group"))?,
            "wrong bytes"
        );
    }
    let took = started.elapsed();
    let counts = fx.proxy.counts();
    let failures = rt.block_on(zone_total(&hosts, |z| z.failures))?;
    eprintln!(
        "both hosts read in {took:?}; registry blob requests: {}; peer failures: {failures}",
        counts.blob_requests
    );
    ensure!(
        took >= Duration::from_secs(7),
        "the registry was not slow: the test exercised nothing"
    );
    ensure!(failures == 0, "the busy home was given up on");
    ensure!(
        counts.blob_requests == 1,
        "the chunk was fetched {} times from the registry",
        counts.blob_requests
    );
    Ok(())
}

#[test]
fn one_caller_cannot_hold_more_than_its_share_of_a_peer() -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let rt = runtime();
    let fx = Fixture::new(&rt)?;
    let a = free_addr(ip(95))?;
    let host = fx.host("a", a, &[a])?;
    rt.block_on(async {
        let layer = crate::cache::Layer::open(&fx.image.reference).await?;
        let repository = {
            let r: brisk_blobcache::reference::Reference = fx.image.reference.parse()?;
            format!("{}/{}", r.registry, r.repository)
        };
        // As many chunks as one request may ask for: far more than the replies' queue and
        // the connection's flow-control window hold while the caller reads nothing.
        let mut locators = Vec::new();
        let mut bytes = 0;
        for k in 0..layer.toc.chunks.len() {
            let c = layer.chunk(k);
            if bytes + c.uncompressed_len > 8 << 20 {
                break;
            }
            bytes += c.uncompressed_len;
            locators.push(brisk_proto::brisk::v1::ChunkLocator {
                digest: c.digest.to_string(),
                blob: c.blob.to_string(),
                repository: repository.clone(),
                compressed_offset: c.compressed.start,
                compressed_length: c.compressed.end - c.compressed.start,
                uncompressed_length: c.uncompressed_len,
                codec: 0,
            });
        }
        ensure!(
            bytes > 2 << 20,
            "the sample is too small to fill a reply queue"
        );
        let key = ZoneKey::from_file(&fx.token)?;
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{a}"))?
            .connect()
            .await?;
        let mut held = Vec::new();
        let mut refused = None;
        for i in 0..40 {
            let r = stamped(
                &key,
                a,
                "Fetch",
                FetchRequest {
                    chunks: locators.clone(),
                    prefetch: false,
                },
            );
            match PeerClient::new(channel.clone()).fetch(r).await {
                // Held open and never read.
                Ok(stream) => held.push(stream),
                Err(status) => {
                    refused = Some((i, status));
                    break;
                }
            }
        }
        let (opened, status) = refused.context("40 unread requests were all taken")?;
        eprintln!("one caller held {opened} unread requests; the next got {status}");
        ensure!(status.code() == tonic::Code::ResourceExhausted, "{status}");
        ensure!(
            opened <= 16,
            "{opened} unread requests were taken from one caller"
        );
        // The daemon is still fine, and another caller (this host itself) is served.
        drop(held);
        fx.read_all(&host, "view".into()).await?;
        Ok(())
    })
}

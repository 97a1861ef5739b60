//! Joins the daemon to its zone: reads the token, resolves the listen and seed addresses,
//! starts gossip, and serves the peer service on TCP next to it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use brisk_blobcache::layered::Layered;
use brisk_blobcache::remote::RegistrySource;
use brisk_blobcache::zone::auth::ZoneKey;
use brisk_blobcache::zone::client::{PeerConfig, PeerSource};
use brisk_blobcache::zone::server::{PeerService, ServeLimits, TraceLookup};
use brisk_blobcache::zone::{gossip, Zone};
use brisk_blobcache::Digest;
use brisk_proto::brisk::v1::peer_server::PeerServer;
use tokio_util::sync::CancellationToken;

use crate::config::PeerSettings;
use crate::traces::Traces;
use crate::{Error, Result};

/// This host's membership: the peer level for the read path, and what serving needs.
pub struct Membership {
    pub source: Arc<PeerSource>,
    key: ZoneKey,
    /// Taken by `serve`.
    listener: Option<tokio::net::TcpListener>,
    gossip: tokio::task::JoinHandle<()>,
    cancel: CancellationToken,
}

/// Joins the zone if the config asks for it. Seeds that are down or do not resolve are not
/// fatal: gossip keeps knocking on the ones it has addresses for.
pub async fn join(
    settings: &PeerSettings,
    registry: Arc<RegistrySource>,
) -> Result<Option<Membership>> {
    let Some(listen) = &settings.listen else {
        return Ok(None);
    };
    let token = settings.token_file.as_deref().ok_or_else(|| {
        Error::InvalidArgument(
            "the peer service needs the zone's token: set peer.token_file or --peer-token-file"
                .into(),
        )
    })?;
    let key = ZoneKey::from_file(token)?;
    let me = resolve(listen).await.ok_or_else(|| {
        Error::InvalidArgument(format!("peer listen address {listen:?} does not resolve"))
    })?;
    if me.ip().is_unspecified() {
        return Err(Error::InvalidArgument(format!(
            "peer listen address {listen:?} must be one the other members can reach, not a wildcard"
        )));
    }
    let mut seeds = Vec::new();
    for s in &settings.peers {
        match resolve(s).await {
            Some(a) => seeds.push(a),
            None => tracing::warn!(seed = s, "zone seed does not resolve; skipped"),
        }
    }
    let listener = tokio::net::TcpListener::bind(me)
        .await
        .map_err(|e| Error::io(format!("tcp {me}"), e))?;
    let zone = Arc::new(Zone::new(me));
    let cancel = CancellationToken::new();
    let gossip = gossip::start(zone.clone(), key.clone(), seeds.clone(), cancel.clone()).await?;
    let config = PeerConfig {
        ack_timeout: Duration::from_millis(settings.ack_timeout_ms.max(1)),
        ..PeerConfig::default()
    };
    let source = Arc::new(PeerSource::new(zone, key.clone(), registry, config));
    tracing::info!(address = %me, seeds = seeds.len(), "zone peer service on");
    Ok(Some(Membership {
        source,
        key,
        listener: Some(listener),
        gossip,
        cancel,
    }))
}

async fn resolve(addr: &str) -> Option<SocketAddr> {
    tokio::net::lookup_host(addr).await.ok()?.next()
}

struct TraceStore(Arc<Traces>);

impl TraceLookup for TraceStore {
    fn trace(&self, image: &Digest) -> Option<Vec<u8>> {
        self.0.get(image).ok().flatten().map(|t| t.encode())
    }
}

impl Membership {
    /// Serves the peer service until [`Membership::leave`].
    pub fn serve(
        &mut self,
        cache: Arc<Layered>,
        registry: Arc<RegistrySource>,
        traces: Arc<Traces>,
    ) -> tokio::task::JoinHandle<()> {
        let service = PeerService::new(
            cache,
            registry,
            self.key.clone(),
            Some(Arc::new(TraceStore(traces))),
            ServeLimits::default(),
        );
        let listener = self
            .listener
            .take()
            .expect("the peer service is served once");
        let cancel = self.cancel.clone();
        tokio::spawn(async move {
            let incoming = tonic::codegen::tokio_stream::wrappers::TcpListenerStream::new(listener);
            let served = tonic::transport::Server::builder()
                .add_service(PeerServer::new(service))
                .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
                .await;
            if let Err(err) = served {
                tracing::error!(%err, "zone peer service stopped");
            }
        })
    }

    /// Leaves the zone (gossip says goodbye) and stops serving.
    pub async fn leave(self) {
        self.cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.gossip).await;
    }
}

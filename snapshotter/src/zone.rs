//! Joins the daemon to its zone: reads the token, resolves the listen and seed addresses,
//! starts gossip, and serves the peer service on TCP next to it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use brisk_blobcache::layered::Layered;
use brisk_blobcache::remote::RegistrySource;
use brisk_blobcache::zone::auth::ZoneKey;
use brisk_blobcache::zone::client::{PeerConfig, PeerSource};
use brisk_blobcache::zone::listen::{ListenLimits, PeerPort};
use brisk_blobcache::zone::server::{PeerService, ServeLimits, TraceLookup};
use brisk_blobcache::zone::{gossip, Zone, ZoneTls};
use brisk_blobcache::Digest;
use tokio_util::sync::CancellationToken;

use crate::config::PeerSettings;
use crate::traces::Traces;
use crate::{Error, Result};

/// This host's membership: the peer level for the read path, and what serving needs.
pub struct Membership {
    pub source: Arc<PeerSource>,
    key: ZoneKey,
    tls: Option<ZoneTls>,
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
    let tls = match (&settings.tls_ca, &settings.tls_cert, &settings.tls_key) {
        (None, None, None) => None,
        (Some(ca), Some(cert), Some(key)) => Some(ZoneTls::load(ca, cert, key)?),
        _ => {
            return Err(Error::InvalidArgument(
                "peer TLS needs all of tls_ca, tls_cert and tls_key".into(),
            ))
        }
    };
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
        tls: tls.clone(),
        ..PeerConfig::default()
    };
    let source = Arc::new(PeerSource::new(zone, key.clone(), registry, config));
    tracing::info!(address = %me, seeds = seeds.len(), tls = tls.is_some(), "zone peer service on");
    Ok(Some(Membership {
        source,
        key,
        tls,
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
    /// Serves the peer service until [`Membership::leave`]. The service knows itself as the
    /// zone's `me` (the resolved listen address gossip announces), so it accepts only stamps
    /// made for that member.
    pub fn serve(
        &mut self,
        cache: Arc<Layered>,
        registry: Arc<RegistrySource>,
        traces: Arc<Traces>,
    ) -> Result<tokio::task::JoinHandle<()>> {
        let service = PeerService::new(
            cache,
            registry,
            self.key.clone(),
            self.source.zone().me(),
            Some(Arc::new(TraceStore(traces))),
            ServeLimits::default(),
        );
        let listener = self
            .listener
            .take()
            .expect("the peer service is served once");
        let cancel = self.cancel.clone();
        let port = PeerPort::new(self.tls.as_ref(), ListenLimits::default())
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        Ok(tokio::spawn(async move {
            let served = port
                .serve(listener, service, cancel.cancelled_owned())
                .await;
            if let Err(err) = served {
                tracing::error!(%err, "zone peer service stopped");
            }
        }))
    }

    /// Leaves the zone (gossip says goodbye) and stops serving.
    pub async fn leave(self) {
        self.cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.gossip).await;
    }
}

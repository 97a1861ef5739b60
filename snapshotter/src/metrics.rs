//! The Prometheus endpoint for the chunk cache's metrics, opened only when configured.

use crate::{Error, Result};

pub fn serve(addr: &str) -> Result<()> {
    let socket: std::net::SocketAddr = addr
        .parse()
        .map_err(|e| Error::InvalidArgument(format!("metrics address {addr:?}: {e}")))?;
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(socket)
        .install()
        .map_err(|e| Error::InvalidArgument(format!("metrics endpoint {addr}: {e}")))?;
    tracing::info!(%addr, "serving metrics");
    Ok(())
}

//! How setting up or serving the zone failed.

#[derive(Debug, thiserror::Error)]
pub enum ZoneError {
    #[error("The zone token must be at least {min} bytes (it has {len})")]
    ShortToken { min: usize, len: usize },
    #[error("Zone token file {path} is not usable")]
    TokenFile {
        path: String,
        #[source]
        source: Box<ZoneError>,
    },
    #[error("The peer service's TLS configuration was refused")]
    Tls(#[source] tonic::transport::Error),
    #[error("The peer service failed")]
    Serve(#[source] tonic::transport::Error),
}

//! Bounds on every size and count a zone peer can put in a message, shared by both ends: a
//! caller never asks for more than a server accepts, and a server checks each bound before
//! it sizes a buffer, loops or fetches from one.
//!
//! The constants are protocol constants, not tuning: a host refuses what is over them with
//! [`OverBound`], whoever sent it. How many connections and requests a host takes is set in
//! `zone::listen::ListenLimits` and `zone::server::ServeLimits`, and refused with the same
//! error.

use std::fmt;

use crate::chunk::Codec;

/// Chunk locators in one `Fetch`. A caller splits larger batches. Why 1024: an 8 MiB request
/// of small chunks (a start's read spans are cut finer than the chunk size) stays one or two
/// requests, while the message stays under [`MAX_REQUEST_MESSAGE`] and the single-flight
/// entries one request opens stay few.
pub const MAX_FETCH_CHUNKS: usize = 1024;

/// Digests in one `Has`: the same bound as a `Fetch`, for the same reasons.
pub const MAX_HAS_DIGESTS: usize = 1024;

/// Bytes of a locator's `registry/repository` text. Distribution registries cap a repository
/// name at 255 characters; a host name fits in the rest.
pub const MAX_REPOSITORY_LEN: usize = 512;

/// Bytes of a start-up trace carried by `GetTrace`. A trace is held whole in memory on both
/// sides; a start touching 50,000 chunks and files is about 10 MiB of JSON, and a larger one
/// is still shared through the registry.
pub const MAX_TRACE_BYTES: usize = 16 << 20;

/// Largest request message the server decodes. A full `Fetch` (1024 locators of two digests,
/// a 512-byte repository and three numbers) is about 700 KiB; this bounds what one request
/// can make the server buffer before its stamp is checked.
pub const MAX_REQUEST_MESSAGE: usize = 1 << 20;

/// Largest reply message either side decodes or encodes: a trace plus its framing (a chunk
/// piece is 256 KiB at most).
pub const MAX_REPLY_MESSAGE: usize = MAX_TRACE_BYTES + (64 << 10);

/// Members the zone view holds. A member with the token can gossip any number of invented
/// members; past this the view stops growing. Why 1024: a zone is a node pool or a rack,
/// tens to hundreds of hosts, and every member is probed, so a zone this large would want
/// splitting anyway.
pub const MAX_MEMBERS: usize = 1024;

/// The most compressed bytes a chunk of `uncompressed` bytes may span in its blob. A zstd frame
/// is never larger than its input plus 1/256 and a few hundred bytes of headers; this allows
/// twice that. Without it a caller could make a home range-read gigabytes from the registry
/// for a chunk of a few bytes.
pub fn max_compressed(codec: Codec, uncompressed: u64) -> u64 {
    match codec {
        Codec::Zstd => uncompressed
            .saturating_add(uncompressed / 128)
            .saturating_add(4096),
        // A gzip member also holds the tar headers after the chunk (`Codec::bound`).
        Codec::GzipPrefix | Codec::ZstdPrefix => codec.bound(uncompressed),
    }
}

/// Which bound a message broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    FetchChunks,
    RequestBytes,
    CompressedBytes,
    RepositoryLen,
    HasDigests,
    TraceBytes,
    GossipDatagram,
    Members,
    Connections,
    AllConnections,
    CallerRequests,
}

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Bound::FetchChunks => "chunks in a fetch",
            Bound::RequestBytes => "uncompressed bytes in a fetch",
            Bound::CompressedBytes => "compressed bytes of a chunk",
            Bound::RepositoryLen => "bytes of a repository name",
            Bound::HasDigests => "digests in a lookup",
            Bound::TraceBytes => "bytes of a trace",
            Bound::GossipDatagram => "bytes of a gossip datagram",
            Bound::Members => "zone members",
            Bound::Connections => "connections from one source",
            Bound::AllConnections => "connections",
            Bound::CallerRequests => "requests open from one caller",
        })
    }
}

/// A size or count in a peer message over its bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("Too many {bound}: {got}, at most {max}")]
pub struct OverBound {
    pub bound: Bound,
    pub got: u64,
    pub max: u64,
}

/// `Ok` if `got` is within `max`.
pub fn check(bound: Bound, got: u64, max: u64) -> Result<(), OverBound> {
    if got > max {
        return Err(OverBound { bound, got, max });
    }
    Ok(())
}

/// A message over a bound is the caller's mistake (or malice); a caller over its share
/// may try again later.
impl From<OverBound> for tonic::Status {
    fn from(err: OverBound) -> Self {
        match err.bound {
            Bound::Connections | Bound::AllConnections | Bound::CallerRequests => {
                tonic::Status::resource_exhausted(err.to_string())
            }
            _ => tonic::Status::invalid_argument(err.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_name_what_was_over() {
        assert_eq!(check(Bound::FetchChunks, 1024, 1024), Ok(()));
        let err = check(Bound::FetchChunks, 1025, 1024).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Too many chunks in a fetch: 1025, at most 1024"
        );
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn a_zstd_frame_always_fits_its_compressed_bound() {
        for len in [0usize, 1, 100, 4096, 1 << 20] {
            // Random bytes do not compress: the worst case for a frame's size.
            let data: Vec<u8> = (0..len).map(|_| rand::random::<u8>()).collect();
            let frame = zstd::bulk::compress(&data, 3).unwrap();
            assert!(
                frame.len() as u64 <= max_compressed(Codec::Zstd, len as u64),
                "{len}"
            );
        }
        assert_eq!(max_compressed(Codec::Zstd, u64::MAX), u64::MAX);
    }
}

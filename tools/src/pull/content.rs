//! Blobs into containerd's content store, through the Content service's streaming `Write`:
//! a `STAT` that opens (or resumes) the ingest, `WRITE`s at increasing offsets, and a `COMMIT`
//! that makes containerd check the size and digest.
//!
//! Writes are idempotent: a blob already in the store is not sent again, only given the
//! labels asked for. Labels are added, never removed, so a second pull with another
//! snapshotter keeps the first one's garbage-collection references.

use std::collections::HashMap;
use std::path::Path;

use brisk_blobcache::Digest;
use containerd_client::services::v1::{
    AbortRequest, Info, InfoRequest, UpdateRequest, WriteAction, WriteContentRequest,
    WriteContentResponse,
};
use futures::channel::mpsc;
use futures::SinkExt;
use tokio::io::{AsyncRead, AsyncReadExt};
use tonic::{Code, Status};

use super::client::{failed, is_code, Session};
use crate::{Error, Result};

/// Bytes per `WRITE` message: well under gRPC's usual 4 MiB message limit, large enough that
/// the per-message round trip does not dominate on a local socket.
const WRITE_CHUNK: usize = 1 << 20;

pub(crate) type Labels = HashMap<String, String>;

/// Whether the store has `digest`.
pub(crate) async fn exists(session: &Session, digest: &Digest) -> Result<bool> {
    let request = session.request(InfoRequest {
        digest: digest.to_string(),
    });
    let result = session.content().info(request).await;
    if is_code(&result, Code::NotFound) {
        return Ok(false);
    }
    result.map_err(failed("content info"))?;
    Ok(true)
}

/// Stores `bytes` as `digest`; returns false if the store had it already.
pub(crate) async fn put_bytes(
    session: &Session,
    digest: &Digest,
    bytes: &[u8],
    labels: Labels,
) -> Result<bool> {
    put(session, digest, bytes.len() as u64, bytes, labels).await
}

/// Stores the file at `path` (`size` bytes) as `digest`; returns false if the store had it.
pub(crate) async fn put_file(
    session: &Session,
    digest: &Digest,
    size: u64,
    path: &Path,
    labels: Labels,
) -> Result<bool> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| Error::io(path, e))?;
    put(session, digest, size, file, labels).await
}

async fn put(
    session: &Session,
    digest: &Digest,
    size: u64,
    reader: impl AsyncRead + Unpin,
    labels: Labels,
) -> Result<bool> {
    if exists(session, digest).await? {
        add_labels(session, digest, labels).await?;
        return Ok(false);
    }
    let reference = format!("brisk-pull-{digest}");
    match write(session, &reference, digest, size, reader, labels.clone()).await {
        Ok(()) => Ok(true),
        // Another client committed the same blob between our `Info` and our commit.
        Err(Error::Containerd { source, .. }) if source.code() == Code::AlreadyExists => {
            add_labels(session, digest, labels).await?;
            Ok(false)
        }
        Err(err) => {
            // Best effort: the ingest also belongs to the lease, so the collector removes it
            // if this fails too.
            let abort = session.request(AbortRequest { r#ref: reference });
            let _ = session.content().abort(abort).await;
            Err(err)
        }
    }
}

/// One `Write` stream, in lock step: containerd answers every message before reading the
/// next, so there is never more than one message in flight.
async fn write(
    session: &Session,
    reference: &str,
    digest: &Digest,
    size: u64,
    mut reader: impl AsyncRead + Unpin,
    labels: Labels,
) -> Result<()> {
    let (mut tx, rx) = mpsc::channel::<WriteContentRequest>(1);
    let total = i64::try_from(size).map_err(|e| Error::invalid("blob size", e))?;
    // The first message must be queued before the call: containerd reads it before it
    // sends the response headers the call waits for.
    tx.try_send(WriteContentRequest {
        action: WriteAction::Stat as i32,
        r#ref: reference.to_owned(),
        total,
        expected: digest.to_string(),
        ..Default::default()
    })
    .expect("a new channel has room for one message");
    let mut responses = session
        .content()
        .write(session.request(rx))
        .await
        .map_err(failed("content write"))?
        .into_inner();
    next(&mut responses).await?;

    let mut buf = vec![0u8; WRITE_CHUNK];
    let mut offset = 0i64;
    loop {
        let n = read_full(&mut reader, &mut buf).await?;
        if n == 0 {
            break;
        }
        let request = WriteContentRequest {
            action: WriteAction::Write as i32,
            r#ref: reference.to_owned(),
            offset,
            data: buf[..n].to_vec(),
            ..Default::default()
        };
        send(&mut tx, &mut responses, request).await?;
        let answer = next(&mut responses).await?;
        offset += n as i64;
        if answer.offset != offset {
            return Err(Error::invalid(
                format!("content write of {digest}"),
                format!(
                    "containerd is at offset {}, expected {offset}",
                    answer.offset
                ),
            ));
        }
    }
    let commit = WriteContentRequest {
        action: WriteAction::Commit as i32,
        r#ref: reference.to_owned(),
        total,
        expected: digest.to_string(),
        offset,
        labels,
        ..Default::default()
    };
    send(&mut tx, &mut responses, commit).await?;
    next(&mut responses).await?;
    drop(tx);
    // Reading to the end lets the server finish the call cleanly.
    while responses
        .message()
        .await
        .map_err(failed("content write"))?
        .is_some()
    {}
    Ok(())
}

type Responses = tonic::codec::Streaming<WriteContentResponse>;

async fn send(
    tx: &mut mpsc::Sender<WriteContentRequest>,
    responses: &mut Responses,
    request: WriteContentRequest,
) -> Result<()> {
    if tx.send(request).await.is_ok() {
        return Ok(());
    }
    // The request stream closed because the call ended; its status says why.
    match responses.message().await {
        Err(status) => Err(failed("content write")(status)),
        Ok(_) => Err(failed("content write")(Status::aborted(
            "containerd closed the write stream",
        ))),
    }
}

async fn next(responses: &mut Responses) -> Result<WriteContentResponse> {
    responses
        .message()
        .await
        .map_err(failed("content write"))?
        .ok_or_else(|| {
            failed("content write")(Status::aborted("containerd ended the write stream early"))
        })
}

/// Fills `buf` unless the reader ends first; returns how much was read.
async fn read_full(reader: &mut (impl AsyncRead + Unpin), buf: &mut [u8]) -> Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = reader
            .read(&mut buf[filled..])
            .await
            .map_err(|e| Error::io("blob being stored", e))?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

/// Adds `labels` to a stored blob, leaving its other labels alone.
pub(crate) async fn add_labels(session: &Session, digest: &Digest, labels: Labels) -> Result<()> {
    if labels.is_empty() {
        return Ok(());
    }
    let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
    let request = session.request(UpdateRequest {
        info: Some(Info {
            digest: digest.to_string(),
            labels,
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask { paths }),
    });
    session
        .content()
        .update(request)
        .await
        .map_err(failed("content update"))?;
    Ok(())
}

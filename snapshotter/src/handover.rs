//! Keeping FUSE connections alive across the daemon's death: the holder, a minimal process
//! that keeps a duplicate of every lazy layer's `/dev/fuse` descriptor, and the protocol the
//! daemon speaks to it over a unix socket (SOCK_SEQPACKET, descriptors passed as SCM_RIGHTS).
//!
//! While the holder keeps a descriptor open the kernel keeps the connection (and the mount)
//! alive, so when the daemon is killed, stopped or upgraded, the containers' reads wait
//! instead of failing; a successor takes the descriptors back, rebuilds each layer's
//! filesystem from the TOC (inode numbers follow from it) and serves the waiting requests
//! (`fs::adopt`). The holder knows nothing of layers: it keeps descriptors by snapshot id
//! with the facts a successor needs about each connection. Every message carries the
//! protocol version; a successor that does not speak the holder's version refuses to start
//! instead of guessing.

use std::collections::BTreeMap;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::socket::{
    self, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr,
};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The hand-over protocol's version. A holder and a daemon of different versions do not
/// talk: the daemon refuses to start, naming both.
pub const VERSION: u32 = 1;

/// Largest message: a reply listing `FDS_PER_MESSAGE` connections fits with room to spare.
const MAX_MESSAGE: usize = 256 << 10;

/// Descriptors per message, below the kernel's SCM_MAX_FD of 253.
const FDS_PER_MESSAGE: usize = 200;

/// Connections one holder keeps at most (one per lazy layer mounted on the host).
const MAX_HELD: usize = 100_000;

/// What a successor needs to know about one held FUSE connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// The snapshot whose lazy layer the connection serves.
    pub id: u64,
    /// The FUSE protocol version the kernel offered at mount (major, minor) and its
    /// capability bits: a successor replays them to its FUSE library as the INIT it will
    /// never get again.
    pub abi: (u32, u32),
    pub capabilities: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Request {
    Hello { version: u32 },
    Put { held: Held },
    Drop { id: u64 },
    Take,
    Quit,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Reply {
    version: u32,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    entries: Vec<Held>,
    /// More `Take` replies follow.
    #[serde(default)]
    more: bool,
}

fn io_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Handover(format!("{what}: {e}"))
}

fn send(sock: BorrowedFd<'_>, msg: &impl Serialize, fds: &[RawFd]) -> Result<()> {
    let bytes = serde_json::to_vec(msg).map_err(|e| io_err("encoding a message", e))?;
    let iov = [IoSlice::new(&bytes)];
    let cmsgs = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsgs };
    socket::sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(|e| io_err("sending to the holder socket", e))?;
    Ok(())
}

/// One message and the descriptors that came with it; `None` when the peer hung up.
fn recv(sock: BorrowedFd<'_>) -> Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = socket::recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| io_err("reading from the holder socket", e))?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(|e| io_err("reading descriptors", e))? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel just installed these descriptors in this process for us
            // (SCM_RIGHTS); nothing else owns them.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let truncated = msg
        .flags
        .contains(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
    let len = msg.bytes;
    if len == 0 && fds.is_empty() {
        return Ok(None);
    }
    if truncated {
        return Err(Error::Handover("a message was too large".into()));
    }
    buf.truncate(len);
    Ok(Some((buf, fds)))
}

fn seqpacket() -> Result<OwnedFd> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| io_err("creating a socket", e))
}

/// The daemon's connection to the holder.
pub struct Client {
    sock: OwnedFd,
}

impl Client {
    /// Connects and checks that both sides speak `VERSION`; `Ok(None)` when no holder
    /// listens at `path`.
    pub fn connect(path: &Path) -> Result<Option<Self>> {
        let sock = seqpacket()?;
        let addr = UnixAddr::new(path).map_err(|e| io_err("holder socket path", e))?;
        match socket::connect(sock.as_raw_fd(), &addr) {
            Ok(()) => {}
            Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ECONNREFUSED) => return Ok(None),
            Err(e) => return Err(io_err("connecting to the holder", e)),
        }
        let client = Self { sock };
        let reply = client.call(&Request::Hello { version: VERSION }, &[])?;
        if reply.version != VERSION {
            return Err(Error::Handover(format!(
                "the holder speaks hand-over version {}, this daemon {VERSION}: stop the old daemon cleanly (brisk stop --unmount) before starting this one",
                reply.version
            )));
        }
        Ok(Some(client))
    }

    fn call(&self, req: &Request, fds: &[RawFd]) -> Result<Reply> {
        send(self.sock.as_fd(), req, fds)?;
        let (bytes, _) =
            recv(self.sock.as_fd())?.ok_or_else(|| Error::Handover("the holder hung up".into()))?;
        let reply: Reply =
            serde_json::from_slice(&bytes).map_err(|e| io_err("the holder's reply", e))?;
        match reply.error {
            Some(e) => Err(Error::Handover(format!("the holder refused: {e}"))),
            None => Ok(reply),
        }
    }

    /// Hands the holder a duplicate of `fd`, the connection of snapshot `held.id`.
    pub fn put(&self, held: Held, fd: BorrowedFd<'_>) -> Result<()> {
        self.call(&Request::Put { held }, &[fd.as_raw_fd()])
            .map(drop)
    }

    /// The holder closes its duplicate of snapshot `id`'s connection (its layer unmounted).
    pub fn forget(&self, id: u64) -> Result<()> {
        self.call(&Request::Drop { id }, &[]).map(drop)
    }

    /// Duplicates of every connection the holder keeps (it keeps its own, so a successor
    /// that dies while taking over loses nothing).
    pub fn take(&self) -> Result<Vec<(Held, OwnedFd)>> {
        send(self.sock.as_fd(), &Request::Take, &[])?;
        let mut out = Vec::new();
        loop {
            let (bytes, fds) = recv(self.sock.as_fd())?
                .ok_or_else(|| Error::Handover("the holder hung up".into()))?;
            let reply: Reply =
                serde_json::from_slice(&bytes).map_err(|e| io_err("the holder's reply", e))?;
            if let Some(e) = reply.error {
                return Err(Error::Handover(format!("the holder refused: {e}")));
            }
            if fds.len() != reply.entries.len() {
                return Err(Error::Handover(format!(
                    "{} connections announced, {} received",
                    reply.entries.len(),
                    fds.len()
                )));
            }
            out.extend(reply.entries.into_iter().zip(fds));
            if !reply.more {
                return Ok(out);
            }
        }
    }

    /// The holder closes every connection and exits (a clean stop).
    pub fn quit(&self) -> Result<()> {
        self.call(&Request::Quit, &[]).map(drop)
    }
}

/// Runs the holder on `path` until told to quit. With no daemon connected for `orphan`, it
/// lets every connection go, so the layers' readers get errors instead of waiting for ever
/// on a daemon that never comes back.
pub fn serve(path: &Path, orphan: Duration) -> Result<()> {
    let listener = seqpacket()?;
    let _ = std::fs::remove_file(path);
    let addr = UnixAddr::new(path).map_err(|e| io_err("holder socket path", e))?;
    // SAFETY: umask only swaps the process's file-creation mask; it cannot fail.
    let old = unsafe { libc::umask(0o077) };
    let bound = socket::bind(listener.as_raw_fd(), &addr);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    bound.map_err(|e| io_err("binding the holder socket", e))?;
    socket::listen(&listener, socket::Backlog::new(8).expect("a small backlog"))
        .map_err(|e| io_err("listening", e))?;
    tracing::info!(socket = %path.display(), version = VERSION, "holding FUSE connections");
    let mut held: BTreeMap<u64, (Held, OwnedFd)> = BTreeMap::new();
    let mut alone_since = Instant::now();
    loop {
        if !held.is_empty() && alone_since.elapsed() > orphan {
            tracing::warn!(
                connections = held.len(),
                "no daemon came back in time; letting the FUSE connections go"
            );
            held.clear();
        }
        let mut pfd = [nix::poll::PollFd::new(
            listener.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ready = nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(1000u16))
            .map_err(|e| io_err("waiting for a daemon", e))?;
        if ready == 0 {
            continue;
        }
        let Ok(raw) = socket::accept(listener.as_raw_fd()) else {
            continue;
        };
        // SAFETY: accept returned a new descriptor that nothing else owns.
        let conn = unsafe { OwnedFd::from_raw_fd(raw) };
        let quit = serve_one(&conn, &mut held);
        alone_since = Instant::now();
        if quit {
            tracing::info!("clean stop: every FUSE connection let go");
            let _ = std::fs::remove_file(path);
            return Ok(());
        }
    }
}

/// Serves one daemon until it hangs up (`false`) or asks the holder to quit (`true`).
fn serve_one(conn: &OwnedFd, held: &mut BTreeMap<u64, (Held, OwnedFd)>) -> bool {
    let reply = |r: Reply, fds: &[RawFd]| send(conn.as_fd(), &r, fds);
    let refuse = |e: String| {
        let _ = reply(
            Reply {
                version: VERSION,
                error: Some(e),
                ..Reply::default()
            },
            &[],
        );
    };
    loop {
        let (bytes, mut fds) = match recv(conn.as_fd()) {
            Ok(Some(m)) => m,
            Ok(None) => return false,
            Err(err) => {
                tracing::warn!(%err, "a daemon's message was unreadable; hanging up");
                return false;
            }
        };
        let req: Request = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                refuse(format!("unreadable request: {e}"));
                continue;
            }
        };
        let ok = Reply {
            version: VERSION,
            ..Reply::default()
        };
        match req {
            Request::Hello { version } => {
                if version != VERSION {
                    tracing::warn!(version, "a daemon of another hand-over version was refused");
                }
                let _ = reply(ok, &[]);
            }
            Request::Put { held: h } => match fds.pop() {
                Some(fd) if fds.is_empty() && held.len() < MAX_HELD => {
                    held.insert(h.id, (h, fd));
                    let _ = reply(ok, &[]);
                }
                _ => refuse("a put carries exactly one descriptor, within the limit".into()),
            },
            Request::Drop { id } => {
                held.remove(&id);
                let _ = reply(ok, &[]);
            }
            Request::Take => {
                let all: Vec<&(Held, OwnedFd)> = held.values().collect();
                let batches: Vec<_> = all.chunks(FDS_PER_MESSAGE).collect();
                let last = batches.len().saturating_sub(1);
                if batches.is_empty() {
                    let _ = reply(ok, &[]);
                }
                for (i, batch) in batches.into_iter().enumerate() {
                    let r = Reply {
                        version: VERSION,
                        entries: batch.iter().map(|(h, _)| h.clone()).collect(),
                        more: i < last,
                        ..Reply::default()
                    };
                    let raw: Vec<RawFd> = batch.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
                    if reply(r, &raw).is_err() {
                        break;
                    }
                }
            }
            Request::Quit => {
                held.clear();
                let _ = reply(ok, &[]);
                return true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe_fd() -> OwnedFd {
        let (r, _w) = nix::unistd::pipe().unwrap();
        r
    }

    #[test]
    fn a_successor_takes_back_what_was_put_and_dropped_ones_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("holder.sock");
        let p = path.clone();
        let holder = std::thread::spawn(move || serve(&p, Duration::from_secs(60)));
        let deadline = Instant::now() + Duration::from_secs(10);
        let first = loop {
            if let Some(c) = Client::connect(&path).unwrap() {
                break c;
            }
            assert!(Instant::now() < deadline, "holder never listened");
            std::thread::sleep(Duration::from_millis(20));
        };
        let held = |id| Held {
            id,
            abi: (7, 41),
            capabilities: 1 << 39,
        };
        // More than one message's worth of descriptors.
        for id in 0..(FDS_PER_MESSAGE as u64 + 5) {
            first.put(held(id), pipe_fd().as_fd()).unwrap();
        }
        first.forget(3).unwrap();
        drop(first);

        let second = Client::connect(&path).unwrap().expect("holder still there");
        let taken = second.take().unwrap();
        assert_eq!(taken.len(), FDS_PER_MESSAGE + 4);
        assert!(taken.iter().all(|(h, _)| h.id != 3));
        assert_eq!(taken[0].0, held(0));
        // Taking leaves the holder its own copies.
        assert_eq!(second.take().unwrap().len(), FDS_PER_MESSAGE + 4);
        second.quit().unwrap();
        holder.join().unwrap().unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn a_daemon_of_another_version_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("holder.sock");
        let p = path.clone();
        std::thread::spawn(move || serve(&p, Duration::from_secs(60)));
        // The socket file appears at bind, a moment before the holder listens.
        let deadline = Instant::now() + Duration::from_secs(10);
        let sock = loop {
            let sock = seqpacket().unwrap();
            if let Ok(addr) = UnixAddr::new(&path) {
                if socket::connect(sock.as_raw_fd(), &addr).is_ok() {
                    break sock;
                }
            }
            assert!(Instant::now() < deadline, "the holder never listened");
            std::thread::sleep(Duration::from_millis(20));
        };
        // A holder of version 1 answers hello with its own version, whatever was asked.
        send(sock.as_fd(), &Request::Hello { version: 99 }, &[]).unwrap();
        let (bytes, _) = recv(sock.as_fd()).unwrap().unwrap();
        let reply: Reply = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(reply.version, VERSION);
    }
}

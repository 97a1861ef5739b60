//! Starting a layer's FUSE session: a fresh mount, or taking over a live connection whose
//! server died (`adopt`).
//!
//! A fresh mount keeps a duplicate of its `/dev/fuse` descriptor for the holder
//! (`crate::handover`). Taking over is what the FUSE library does not offer: the kernel sends
//! INIT once per connection, and the library will not serve without one. So the successor
//! replays the INIT the kernel sent at mount (its protocol version and capabilities, recorded
//! then) to the library over a socket pair, lets it answer there, and then puts the live
//! connection under the library's descriptor number (`dup3`) before its loop starts. Finally it
//! asks the kernel to resend the requests the dead server had read but not answered
//! (`FUSE_NOTIFY_RESEND`, Linux 6.9 and later).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use fuser::{BackgroundSession, MountOption, Session, SessionACL};
use serde::{Deserialize, Serialize};

use super::LayerFs;
use crate::{Error, Result};

/// The kernel's side of a connection, as its INIT described it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connection {
    /// FUSE protocol version (major, minor) the kernel offered.
    pub abi: (u32, u32),
    /// The kernel's capability bits (`flags | flags2 << 32`).
    pub capabilities: u64,
}

/// A layer's FUSE session, with what a successor needs to serve its connection.
pub struct MountedLayer {
    pub session: BackgroundSession,
    /// A duplicate of the connection's descriptor, for the holder.
    pub fd: OwnedFd,
    pub connection: Connection,
    /// Whether dropping `session` unmounts (a fresh mount) or not (an adopted connection,
    /// whose mount the caller detaches).
    pub owns_mount: bool,
}

fn config() -> fuser::Config {
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::FSName("brisk".into()),
        MountOption::Subtype("brisk".into()),
        MountOption::DefaultPermissions,
    ];
    // containerd, runc and the container's processes are not necessarily the daemon's user.
    config.acl = SessionACL::All;
    config
}

fn mount_err(mountpoint: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Mount {
        path: mountpoint.display().to_string(),
        source,
    }
}

/// Mounts read-only at `mountpoint` (allow_other, ro, fsname and subtype "brisk",
/// default_permissions so the kernel checks modes) and starts serving.
pub fn mount(fs: LayerFs, mountpoint: &Path) -> Result<MountedLayer> {
    let seen = fs.init_seen.clone();
    let session = Session::new(fs, mountpoint, &config()).map_err(mount_err(mountpoint))?;
    let fd = session
        .as_fd()
        .try_clone_to_owned()
        .map_err(mount_err(mountpoint))?;
    let connection = seen
        .lock()
        .expect("not poisoned")
        .ok_or_else(|| Error::Handover("the FUSE session started without an INIT".into()))?;
    let session = session.spawn().map_err(mount_err(mountpoint))?;
    Ok(MountedLayer {
        session,
        fd,
        connection,
        owns_mount: true,
    })
}

/// `FUSE_INIT`'s opcode, and the capability bit that says `flags2` is there.
const FUSE_INIT: u32 = 26;
const FUSE_INIT_EXT: u64 = 1 << 30;
/// The notification asking the kernel to resend requests not yet answered.
const FUSE_NOTIFY_RESEND: i32 = 7;

/// The INIT request the kernel sent when the connection was made, rebuilt from what it said.
fn init_request(c: &Connection) -> Vec<u8> {
    let caps = c.capabilities | if c.abi.1 >= 36 { FUSE_INIT_EXT } else { 0 };
    let mut m = Vec::with_capacity(104);
    // fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, padding.
    m.extend_from_slice(&104u32.to_le_bytes());
    m.extend_from_slice(&FUSE_INIT.to_le_bytes());
    m.extend_from_slice(&1u64.to_le_bytes());
    m.extend_from_slice(&0u64.to_le_bytes());
    m.extend_from_slice(&[0u8; 16]);
    // fuse_init_in: major, minor, max_readahead, flags, flags2, unused[11].
    m.extend_from_slice(&c.abi.0.to_le_bytes());
    m.extend_from_slice(&c.abi.1.to_le_bytes());
    m.extend_from_slice(&(128u32 << 10).to_le_bytes());
    m.extend_from_slice(&(caps as u32).to_le_bytes());
    m.extend_from_slice(&((caps >> 32) as u32).to_le_bytes());
    m.extend_from_slice(&[0u8; 44]);
    m
}

/// Serves `fd`, a live connection to a layer already mounted at `mountpoint` whose server
/// died, from `fs` (rebuilt from the same TOC, so inode numbers and directory offsets are the
/// ones the kernel already knows).
pub fn adopt(
    fs: LayerFs,
    fd: OwnedFd,
    connection: Connection,
    mountpoint: &Path,
) -> Result<MountedLayer> {
    let err = mount_err(mountpoint);
    let (library, replay) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| err(e.into()))?;
    nix::unistd::write(&replay, &init_request(&connection)).map_err(|e| err(e.into()))?;
    let session = Session::from_fd(fs, library, SessionACL::All, config()).map_err(&err)?;
    // The library answered the replayed INIT on the socket pair; from here on its
    // descriptor number is the live connection. Nothing reads or writes it meanwhile: the
    // session's loop has not started.
    let number = session.as_fd().as_raw_fd();
    // SAFETY: `fd` and `number` are open descriptors of this process; dup3 atomically makes
    // `number` refer to `fd`'s open file, closing the socket pair end it referred to. The
    // session keeps owning `number`, now the connection.
    let r = unsafe { libc::dup3(fd.as_raw_fd(), number, libc::O_CLOEXEC) };
    if r < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    drop(replay);
    resend(&fd);
    let session = session.spawn().map_err(&err)?;
    Ok(MountedLayer {
        session,
        fd,
        connection,
        owns_mount: false,
    })
}

/// Asks the kernel to queue again every request the previous server read but did not
/// answer. Kernels before 6.9 refuse the notification: those requests then stay unanswered
/// until their callers give up (they are killable) or the connection is aborted.
fn resend(fd: &OwnedFd) {
    let mut m = Vec::with_capacity(16);
    m.extend_from_slice(&16u32.to_le_bytes());
    m.extend_from_slice(&FUSE_NOTIFY_RESEND.to_le_bytes());
    m.extend_from_slice(&0u64.to_le_bytes());
    if let Err(err) = nix::unistd::write(fd, &m) {
        tracing::warn!(%err, "the kernel cannot resend unanswered FUSE requests (Linux 6.9 or later is needed); reads in flight when the daemon died stay unanswered");
    }
}

/// Keeps a `BackgroundSession` running without ever unmounting it: the process is about
/// to exit and leave the connection to the holder and a successor.
pub(crate) fn leave(session: BackgroundSession) {
    std::mem::forget(Arc::new(session));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replayed_init_is_what_the_kernel_sends() {
        let c = Connection {
            abi: (7, 41),
            capabilities: (1 << 39) | 1,
        };
        let m = init_request(&c);
        assert_eq!(m.len(), 104);
        assert_eq!(u32::from_le_bytes(m[0..4].try_into().unwrap()), 104);
        assert_eq!(u32::from_le_bytes(m[4..8].try_into().unwrap()), FUSE_INIT);
        assert_eq!(u32::from_le_bytes(m[40..44].try_into().unwrap()), 7);
        assert_eq!(u32::from_le_bytes(m[44..48].try_into().unwrap()), 41);
        let flags = u32::from_le_bytes(m[52..56].try_into().unwrap());
        let flags2 = u32::from_le_bytes(m[56..60].try_into().unwrap());
        assert_eq!(
            u64::from(flags) | u64::from(flags2) << 32,
            c.capabilities | FUSE_INIT_EXT
        );
    }
}

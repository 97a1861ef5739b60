//! The daemon in-process on a temporary root, and a client of its socket speaking the
//! snapshots API as containerd's proxy snapshotter does; helpers to read its answers.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use brisk_proto::containerd::services::snapshots::v1 as api;
use brisk_proto::containerd::services::snapshots::v1::snapshots_client::SnapshotsClient;
use brisk_proto::containerd::types::Mount;
use brisk_snapshotter::config::Config;
use brisk_snapshotter::Stop;
use tonic::transport::Channel;
use tonic::{Code, Status};

pub const NAME: &str = "brisk";

/// The daemon on a temporary root, and a client of its socket.
pub struct Daemon {
    pub root: PathBuf,
    pub client: SnapshotsClient<Channel>,
    stop: Option<tokio::sync::oneshot::Sender<Stop>>,
    served: tokio::task::JoinHandle<brisk_snapshotter::Result<Stop>>,
    _dir: tempfile::TempDir,
}

impl Daemon {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            root: dir.path().join("root"),
            address: dir.path().join("brisk.sock"),
            ..Config::default()
        };
        // No holder process, no registry: only the snapshots API is under test.
        config.handover.enabled = false;
        config.trace.fetch_from_registry = false;
        config.cache.memory_bytes = 1 << 20;
        config.cache.disk_bytes = 1 << 20;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let socket = config.address.clone();
        let root = config.root.clone();
        let served = tokio::spawn(brisk_snapshotter::run(config, async {
            stopped.await.unwrap_or(Stop::Clean)
        }));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(!served.is_finished(), "the daemon stopped before serving");
            assert!(
                std::time::Instant::now() < deadline,
                "the daemon never served"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let channel = containerd_client::connect(&socket).await.unwrap();
        Self {
            root,
            client: SnapshotsClient::new(channel),
            stop: Some(stop),
            served,
            _dir: dir,
        }
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(Stop::Clean);
        let served = (&mut self.served).await.unwrap();
        assert!(served.is_ok(), "the daemon failed: {served:?}");
    }

    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    pub async fn prepare(&mut self, key: &str, parent: &str) -> Result<Vec<Mount>, Status> {
        self.prepare_labelled(key, parent, &[]).await
    }

    pub async fn prepare_labelled(
        &mut self,
        key: &str,
        parent: &str,
        labels: &[(&str, &str)],
    ) -> Result<Vec<Mount>, Status> {
        let r = self
            .client
            .prepare(api::PrepareSnapshotRequest {
                snapshotter: NAME.into(),
                key: key.into(),
                parent: parent.into(),
                labels: labels_of(labels),
            })
            .await?;
        Ok(r.into_inner().mounts)
    }

    pub async fn view(&mut self, key: &str, parent: &str) -> Result<Vec<Mount>, Status> {
        self.view_labelled(key, parent, &[]).await
    }

    pub async fn view_labelled(
        &mut self,
        key: &str,
        parent: &str,
        labels: &[(&str, &str)],
    ) -> Result<Vec<Mount>, Status> {
        let r = self
            .client
            .view(api::ViewSnapshotRequest {
                snapshotter: NAME.into(),
                key: key.into(),
                parent: parent.into(),
                labels: labels_of(labels),
            })
            .await?;
        Ok(r.into_inner().mounts)
    }

    pub async fn mounts(&mut self, key: &str) -> Result<Vec<Mount>, Status> {
        let r = self
            .client
            .mounts(api::MountsRequest {
                snapshotter: NAME.into(),
                key: key.into(),
            })
            .await?;
        Ok(r.into_inner().mounts)
    }

    pub async fn commit(&mut self, name: &str, key: &str) -> Result<(), Status> {
        self.commit_labelled(name, key, &[]).await
    }

    pub async fn commit_labelled(
        &mut self,
        name: &str,
        key: &str,
        labels: &[(&str, &str)],
    ) -> Result<(), Status> {
        self.client
            .commit(api::CommitSnapshotRequest {
                snapshotter: NAME.into(),
                name: name.into(),
                key: key.into(),
                labels: labels_of(labels),
            })
            .await?;
        Ok(())
    }

    pub async fn remove(&mut self, key: &str) -> Result<(), Status> {
        self.client
            .remove(api::RemoveSnapshotRequest {
                snapshotter: NAME.into(),
                key: key.into(),
            })
            .await?;
        Ok(())
    }

    pub async fn stat(&mut self, key: &str) -> Result<api::Info, Status> {
        let r = self
            .client
            .stat(api::StatSnapshotRequest {
                snapshotter: NAME.into(),
                key: key.into(),
            })
            .await?;
        Ok(r.into_inner().info.expect("Stat answers an info"))
    }

    pub async fn update(&mut self, info: api::Info, paths: &[&str]) -> Result<api::Info, Status> {
        let r = self
            .client
            .update(api::UpdateSnapshotRequest {
                snapshotter: NAME.into(),
                info: Some(info),
                update_mask: Some(prost_types::FieldMask {
                    paths: paths.iter().map(|p| p.to_string()).collect(),
                }),
            })
            .await?;
        Ok(r.into_inner().info.expect("Update answers an info"))
    }

    pub async fn usage(&mut self, key: &str) -> Result<(i64, i64), Status> {
        let r = self
            .client
            .usage(api::UsageRequest {
                snapshotter: NAME.into(),
                key: key.into(),
            })
            .await?
            .into_inner();
        Ok((r.size, r.inodes))
    }

    pub async fn walk(&mut self, filters: &[&str]) -> Result<Vec<api::Info>, Status> {
        let mut stream = self
            .client
            .list(api::ListSnapshotsRequest {
                snapshotter: NAME.into(),
                filters: filters.iter().map(|f| f.to_string()).collect(),
            })
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(batch) = stream.message().await? {
            out.extend(batch.info);
        }
        Ok(out)
    }

    pub async fn names(&mut self, filters: &[&str]) -> Vec<String> {
        let mut names: Vec<String> = self
            .walk(filters)
            .await
            .unwrap_or_else(|e| panic!("walk {filters:?}: {e}"))
            .into_iter()
            .map(|i| i.name)
            .collect();
        names.sort();
        names
    }

    pub async fn cleanup(&mut self) -> Result<(), Status> {
        self.client
            .cleanup(api::CleanupRequest {
                snapshotter: NAME.into(),
            })
            .await?;
        Ok(())
    }
}

pub fn labels_of(labels: &[(&str, &str)]) -> HashMap<String, String> {
    labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn sorted(labels: &HashMap<String, String>) -> BTreeMap<&str, &str> {
    labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// Asserts a refusal's code and its whole message.
#[track_caller]
pub fn refused<T: std::fmt::Debug>(answer: Result<T, Status>, code: Code, message: &str) {
    match answer {
        Err(s) => {
            assert_eq!(s.code(), code, "{s:?}");
            assert_eq!(s.message(), message);
        }
        Ok(v) => panic!("expected {code:?} ({message}), got {v:?}"),
    }
}

pub fn time(t: &Option<prost_types::Timestamp>) -> SystemTime {
    let t = t.as_ref().expect("a time");
    SystemTime::UNIX_EPOCH + Duration::new(t.seconds as u64, t.nanos as u32)
}

pub fn kind(k: api::Kind) -> i32 {
    k as i32
}

/// The directory of an active snapshot without parent: its one bind mount's source.
pub fn bind_source(mounts: &[Mount]) -> PathBuf {
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    assert_eq!(mounts[0].r#type, "bind", "{mounts:?}");
    PathBuf::from(&mounts[0].source)
}

/// An overlay mount's `upperdir`.
pub fn upper(mounts: &[Mount]) -> PathBuf {
    let opt = mounts[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("upperdir="))
        .unwrap_or_else(|| panic!("no upperdir in {mounts:?}"));
    PathBuf::from(opt)
}

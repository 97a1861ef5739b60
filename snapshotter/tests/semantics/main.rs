//! containerd's snapshots API semantics, as a client of the daemon's socket sees them: the
//! daemon runs in-process on a temporary root, and each test speaks gRPC to it the way
//! containerd's proxy snapshotter does.
//!
//! The workflows are those of containerd's snapshotter test suite (`snapshots/testsuite`)
//! that need no mount (Basic, StatActive, StatCommitted, Transitivity, PrepareView, Update,
//! Remove, Walk, RootPermission), plus the details of containerd's overlayfs snapshotter and
//! its metastore a client can see: error codes and words, times, usage, label bounds,
//! Cleanup. Needs no root; the ownership test runs its check only as root, and says so.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::SystemTime;

use brisk_proto::containerd::services::snapshots::v1 as api;
use tonic::Code;

mod client;

use client::{bind_source, kind, labels_of, refused, sorted, time, upper, Daemon, NAME};

const GC_ROOT: (&str, &str) = ("containerd.io/gc.root", "2026-01-01T00:00:00Z");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_workflow_with_stat_walk_view_and_remove() {
    let mut d = Daemon::start().await;
    let m = d
        .prepare_labelled("preparing", "", &[GC_ROOT])
        .await
        .unwrap();
    std::fs::write(bind_source(&m).join("foo"), "foo\n").unwrap();
    d.commit_labelled("committed", "preparing", &[GC_ROOT])
        .await
        .unwrap();
    let si = d.stat("committed").await.unwrap();
    assert_eq!(
        (si.parent.as_str(), si.kind),
        ("", kind(api::Kind::Committed))
    );
    refused(
        d.stat("preparing").await,
        Code::NotFound,
        "snapshot does not exist: not found",
    );

    let m = d
        .prepare_labelled("next", "committed", &[GC_ROOT])
        .await
        .unwrap();
    assert_eq!(m[0].r#type, "overlay", "{m:?}");
    let ni = d.stat("next").await.unwrap();
    assert_eq!(
        (ni.parent.as_str(), ni.kind),
        ("committed", kind(api::Kind::Active))
    );
    d.commit_labelled("committed-next", "next", &[GC_ROOT])
        .await
        .unwrap();
    let si2 = d.stat("committed-next").await.unwrap();
    assert_eq!(
        (si2.parent.as_str(), si2.kind),
        ("committed", kind(api::Kind::Committed))
    );
    refused(
        d.stat("next").await,
        Code::NotFound,
        "snapshot does not exist: not found",
    );

    // Walk gives exactly what Stat gives.
    let walked = d.walk(&[]).await.unwrap();
    for want in [&si, &si2] {
        let got = walked.iter().find(|i| i.name == want.name).expect("walked");
        assert_eq!(got, want);
    }

    let v = d
        .view_labelled("view", "committed-next", &[GC_ROOT])
        .await
        .unwrap();
    // A view of a chain of two is a read-only overlay of both, nearest first, with the
    // same `index=off` containerd gives it.
    assert_eq!(v[0].r#type, "overlay");
    assert_eq!(v[0].options.len(), 2, "{v:?}");
    assert_eq!(v[0].options[0], "index=off");
    let lower = v[0].options[1].strip_prefix("lowerdir=").expect("lowerdir");
    assert_eq!(lower.split(':').count(), 2, "{v:?}");
    let vi = d.stat("view").await.unwrap();
    assert_eq!(
        (vi.parent.as_str(), vi.kind),
        ("committed-next", kind(api::Kind::View))
    );
    d.remove("view").await.unwrap();
    refused(
        d.remove("committed").await,
        Code::FailedPrecondition,
        "failed to remove: cannot remove snapshot with child: failed precondition",
    );
    d.remove("committed-next").await.unwrap();
    d.remove("committed").await.unwrap();
    refused(
        d.remove("committed").await,
        Code::NotFound,
        "failed to remove: snapshot committed: not found",
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parents_are_transitive() {
    let mut d = Daemon::start().await;
    d.prepare("preparing", "").await.unwrap();
    d.commit("snapA", "preparing").await.unwrap();
    d.prepare("next", "snapA").await.unwrap();
    d.commit("snapB", "next").await.unwrap();
    let b = d.stat("snapB").await.unwrap();
    assert_eq!(b.parent, "snapA");
    assert_eq!(d.stat(&b.parent).await.unwrap().parent, "");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_in_use_is_refused_to_prepare_and_view() {
    let mut d = Daemon::start().await;
    d.prepare("preparing", "").await.unwrap();
    d.commit("snapA", "preparing").await.unwrap();
    let exists = |k: &str| format!("failed to create snapshot: snapshot {k}: already exists");
    d.prepare("newlayer", "snapA").await.unwrap();
    refused(
        d.view("newlayer", "snapA").await,
        Code::AlreadyExists,
        &exists("newlayer"),
    );
    d.prepare("prepLayer", "snapA").await.unwrap();
    refused(
        d.prepare("prepLayer", "snapA").await,
        Code::AlreadyExists,
        &exists("prepLayer"),
    );
    d.view("viewLayer", "snapA").await.unwrap();
    refused(
        d.view("viewLayer", "snapA").await,
        Code::AlreadyExists,
        &exists("viewLayer"),
    );
    // A committed name is a key in use too.
    refused(
        d.prepare("snapA", "").await,
        Code::AlreadyExists,
        &exists("snapA"),
    );
    d.stop().await;
}

/// The six snapshots of containerd's `baseTestSnapshots`.
async fn base_snapshots(d: &mut Daemon) {
    d.prepare_labelled("c1-a", "", &[GC_ROOT]).await.unwrap();
    d.commit_labelled("c1", "c1-a", &[GC_ROOT]).await.unwrap();
    d.prepare_labelled("c2-a", "c1", &[GC_ROOT]).await.unwrap();
    d.commit_labelled("c2", "c2-a", &[GC_ROOT]).await.unwrap();
    d.prepare_labelled("a1", "c2", &[GC_ROOT]).await.unwrap();
    d.prepare_labelled("a2", "", &[GC_ROOT]).await.unwrap();
    d.view_labelled("v1", "c2", &[GC_ROOT]).await.unwrap();
    d.view_labelled("v2", "", &[GC_ROOT]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_follows_containerds_test_suite() {
    let mut d = Daemon::start().await;
    let t1 = SystemTime::now();
    base_snapshots(&mut d).await;
    let t2 = SystemTime::now();
    let cases = [
        ("c1", api::Kind::Committed, ""),
        ("c2", api::Kind::Committed, "c1"),
        ("a1", api::Kind::Active, "c2"),
        ("a2", api::Kind::Active, ""),
        ("v1", api::Kind::View, "c2"),
        ("v2", api::Kind::View, ""),
    ];
    for (name, k, parent) in cases {
        let mut st = d.stat(name).await.unwrap();
        let created = time(&st.created_at);
        assert!(
            t1 <= created && created <= t2,
            "{name}: created {created:?}"
        );
        // A commit is the committed snapshot's creation: both times are the commit's.
        assert_eq!(st.created_at, st.updated_at, "{name}");
        assert_eq!(
            (st.kind, st.parent.as_str(), st.name.as_str()),
            (kind(k), parent, name)
        );

        let root = ("containerd.io/gc.root", "rooted");
        let expected = labels_of(&[("l1", "v1"), ("l2", "v2"), ("l3", "v3"), root]);
        st.parent = "doesnotexist".into();
        st.labels = expected.clone();
        let u1 = SystemTime::now();
        let st = d.update(st, &[]).await.unwrap();
        let u2 = SystemTime::now();
        assert_eq!(time(&st.created_at), created, "{name}");
        let updated = time(&st.updated_at);
        assert!(
            u1 <= updated && updated <= u2,
            "{name}: updated {updated:?}"
        );
        assert_eq!(
            (st.kind, st.parent.as_str(), st.name.as_str()),
            (kind(k), parent, name)
        );
        assert_eq!(sorted(&st.labels), sorted(&expected), "{name}");
        // What Update answered is what a later Stat answers, to the nanosecond.
        assert_eq!(d.stat(name).await.unwrap(), st, "{name}");

        let mut st = st;
        st.labels = labels_of(&[("l1", "updated"), ("l4", "v4")]);
        let st = d.update(st, &["labels.l1", "labels.l2"]).await.unwrap();
        let expected = labels_of(&[("l1", "updated"), ("l3", "v3"), root]);
        assert_eq!(sorted(&st.labels), sorted(&expected), "{name}");

        let mut st = st;
        let expected = labels_of(&[("l4", "v4"), root]);
        st.labels = expected.clone();
        let mut st = d.update(st, &["labels"]).await.unwrap();
        assert_eq!(sorted(&st.labels), sorted(&expected), "{name}");

        st.parent = "doesnotexist".into();
        refused(
            d.update(st, &["parent"]).await,
            Code::InvalidArgument,
            &format!(r#"cannot update "parent" field on snapshot "{name}": invalid argument"#),
        );
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_keys_can_be_used_again() {
    let mut d = Daemon::start().await;
    d.prepare("committed-a", "").await.unwrap();
    d.commit("committed-1", "committed-a").await.unwrap();
    d.prepare("reuse-1", "committed-1").await.unwrap();
    d.remove("reuse-1").await.unwrap();
    d.view("reuse-1", "committed-1").await.unwrap();
    d.remove("reuse-1").await.unwrap();
    d.prepare("reuse-1", "").await.unwrap();
    d.remove("committed-1").await.unwrap();
    d.commit("committed-1", "reuse-1").await.unwrap();
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walk_filters_as_containerds_test_suite_and_grammar() {
    let mut d = Daemon::start().await;
    let root = ("containerd.io/gc.root", "check-walk");
    d.prepare_labelled("a-np", "", &[root]).await.unwrap();
    d.prepare_labelled("p-tmp", "", &[root]).await.unwrap();
    d.commit_labelled("p", "p-tmp", &[root]).await.unwrap();
    d.prepare_labelled("a", "p", &[root]).await.unwrap();
    d.view_labelled("v", "p", &[root]).await.unwrap();
    d.prepare_labelled("p-wl-tmp", "", &[root]).await.unwrap();
    d.commit_labelled("p-wl", "p-wl-tmp", &[("l", "1"), root])
        .await
        .unwrap();
    d.prepare_labelled("a-wl", "p-wl", &[("l", "2"), root])
        .await
        .unwrap();
    d.view_labelled("v-wl", "p-wl", &[("l", "3"), root])
        .await
        .unwrap();
    d.prepare_labelled("a-np-wl", "", &[("l", "2"), root])
        .await
        .unwrap();
    let cases: &[(&[&str], &[&str])] = &[
        (
            &[r#"labels."containerd.io/gc.root"==check-walk"#],
            &["a", "a-np", "a-np-wl", "a-wl", "p", "p-wl", "v", "v-wl"],
        ),
        (
            &[r#"kind==active,labels."containerd.io/gc.root"==check-walk"#],
            &["a", "a-np", "a-np-wl", "a-wl"],
        ),
        (
            &[r#"kind==view,labels."containerd.io/gc.root"==check-walk"#],
            &["v", "v-wl"],
        ),
        (
            &[r#"kind==committed,labels."containerd.io/gc.root"==check-walk"#],
            &["p", "p-wl"],
        ),
        (&["name==p", "name==a-np-wl"], &["a-np-wl", "p"]),
        (&["name==a-wl,labels.l"], &["a-wl"]),
        (&["parent==p"], &["a", "v"]),
        (
            &[r#"parent!="",labels."containerd.io/gc.root"==check-walk"#],
            &["a", "a-wl", "v", "v-wl"],
        ),
        (&["labels.l"], &["a-np-wl", "a-wl", "p-wl", "v-wl"]),
        (&["labels.l==2"], &["a-np-wl", "a-wl"]),
        // containerd's grammar beyond the suite: an absent label is the empty string for
        // != and ~=, an unknown field is absent, a bad expression matches nothing.
        (&[r#"labels.l!="""#], &["a-np-wl", "a-wl", "p-wl", "v-wl"]),
        (&["labels.l~=^$,kind==committed"], &["p"]),
        (&["nosuchfield==x"], &[]),
        (&["name~=/^a-np/"], &["a-np", "a-np-wl"]),
        (&["name~=("], &[]),
        (
            &[""],
            &["a", "a-np", "a-np-wl", "a-wl", "p", "p-wl", "v", "v-wl"],
        ),
    ];
    for (filters, want) in cases {
        assert_eq!(d.names(filters).await, *want, "{filters:?}");
    }
    refused(
        d.walk(&["name==/p/"]).await,
        Code::InvalidArgument,
        "filters: parse error: [name== >|/|< p/]: invalid quote encountered: invalid argument",
    );
    refused(
        d.walk(&["name==/p"]).await,
        Code::InvalidArgument,
        "filters: parse error: [name== >|/|< p]: quoted literal not terminated: invalid argument",
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_carry_containerds_codes_and_words() {
    let mut d = Daemon::start().await;
    d.prepare("a", "").await.unwrap();
    // containerd's metastore: a parent that is not committed is an invalid argument, a
    // missing one is not found, and both are looked at before the key.
    refused(
        d.prepare("b", "a").await,
        Code::InvalidArgument,
        r#"failed to create snapshot: parent "a" is not committed snapshot: invalid argument"#,
    );
    refused(
        d.view("b", "a").await,
        Code::InvalidArgument,
        r#"failed to create snapshot: parent "a" is not committed snapshot: invalid argument"#,
    );
    refused(
        d.prepare("a", "nope").await,
        Code::NotFound,
        r#"failed to create snapshot: missing parent "nope" bucket: not found"#,
    );
    d.commit("c", "a").await.unwrap();
    d.view("v", "c").await.unwrap();
    refused(
        d.commit("x", "v").await,
        Code::FailedPrecondition,
        r#"failed to commit snapshot: snapshot "v" is not active: failed precondition"#,
    );
    refused(
        d.commit("x", "c").await,
        Code::FailedPrecondition,
        r#"failed to commit snapshot: snapshot "c" is not active: failed precondition"#,
    );
    // An existing name is refused before the key's kind is looked at.
    refused(
        d.commit("c", "v").await,
        Code::AlreadyExists,
        "failed to commit snapshot: committed snapshot c: already exists",
    );
    refused(
        d.commit("x", "gone").await,
        Code::NotFound,
        "snapshot does not exist: not found",
    );
    refused(
        d.mounts("c").await,
        Code::FailedPrecondition,
        "failed to get active mount: requested snapshot c not active or view: failed precondition",
    );
    refused(
        d.mounts("gone").await,
        Code::NotFound,
        "failed to get active mount: snapshot does not exist: not found",
    );
    assert_eq!(d.mounts("v").await.unwrap(), d.mounts("v").await.unwrap());
    refused(
        d.usage("gone").await,
        Code::NotFound,
        "snapshot does not exist: not found",
    );
    let missing = api::Info {
        name: "gone".into(),
        ..Default::default()
    };
    refused(
        d.update(missing, &[]).await,
        Code::NotFound,
        "snapshot does not exist: not found",
    );
    // No info at all names no snapshot.
    let none = d
        .client
        .update(api::UpdateSnapshotRequest {
            snapshotter: NAME.into(),
            info: None,
            update_mask: None,
        })
        .await;
    refused(none, Code::NotFound, "snapshot does not exist: not found");
    // containerd bounds a label's key and value together to 4096 bytes.
    let long = "v".repeat(4096 - "key-of-a-label".len());
    d.prepare_labelled("fits", "", &[("key-of-a-label", &long)])
        .await
        .unwrap();
    let over = format!("{long}v");
    let too_large = "info.Labels: label key and value greater than maximum size (4096 bytes), \
                     key: key-of-a-l: invalid argument";
    refused(
        d.prepare_labelled("big", "", &[("key-of-a-label", &over)])
            .await,
        Code::InvalidArgument,
        too_large,
    );
    refused(
        d.view_labelled("big", "", &[("key-of-a-label", &over)])
            .await,
        Code::InvalidArgument,
        too_large,
    );
    refused(
        d.commit_labelled("big", "fits", &[("key-of-a-label", &over)])
            .await,
        Code::InvalidArgument,
        too_large,
    );
    let mut info = d.stat("fits").await.unwrap();
    info.labels = labels_of(&[("key-of-a-label", &over)]);
    refused(d.update(info, &[]).await, Code::InvalidArgument, too_large);
    assert!(d.names(&["name==big"]).await.is_empty());
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_label_values_are_never_kept() {
    let mut d = Daemon::start().await;
    d.prepare_labelled("a", "", &[("x", ""), ("y", "1")])
        .await
        .unwrap();
    assert_eq!(
        sorted(&d.stat("a").await.unwrap().labels),
        BTreeMap::from([("y", "1")])
    );
    d.commit_labelled("c", "a", &[("x", ""), ("z", "2")])
        .await
        .unwrap();
    let mut info = d.stat("c").await.unwrap();
    assert_eq!(sorted(&info.labels), BTreeMap::from([("z", "2")]));
    info.labels = labels_of(&[("z", ""), ("w", "3")]);
    let updated = d.update(info, &[]).await.unwrap();
    assert_eq!(sorted(&updated.labels), BTreeMap::from([("w", "3")]));
    assert_eq!(d.stat("c").await.unwrap(), updated);
    // So `labels.x` never finds an empty label.
    assert!(d.names(&["labels.x"]).await.is_empty());
    d.stop().await;
}

/// Bytes (allocated blocks) and inodes of `dir` and what is under it, as containerd's
/// `fs.DiskUsage` counts them.
fn du(dir: &Path) -> (i64, i64) {
    let mut seen = std::collections::HashSet::new();
    let (mut size, mut inodes) = (0, 0);
    let mut stack = vec![dir.to_owned()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        if seen.insert(m.ino()) {
            size += m.blocks() as i64 * 512;
            inodes += 1;
        }
        if m.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
    (size, inodes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_counts_actives_now_commits_once_and_views_not_at_all() {
    let mut d = Daemon::start().await;
    let m = d.prepare("a", "").await.unwrap();
    let fs = bind_source(&m);
    // The directory itself is one inode with its blocks, as in containerd.
    let empty = d.usage("a").await.unwrap();
    assert_eq!(empty, du(&fs));
    assert_eq!(empty.1, 1);
    std::fs::create_dir(fs.join("dir")).unwrap();
    std::fs::write(fs.join("dir/file"), vec![7u8; 100_000]).unwrap();
    std::fs::hard_link(fs.join("dir/file"), fs.join("link")).unwrap();
    let written = d.usage("a").await.unwrap();
    assert_eq!(written, du(&fs));
    assert_eq!(written.1, 3, "a hard link is one inode");
    assert!(written.0 >= empty.0 + 100_000, "{written:?}");
    d.commit("c", "a").await.unwrap();
    assert_eq!(d.usage("c").await.unwrap(), written);
    // Measured at commit, not again.
    std::fs::write(fs.join("later"), vec![7u8; 100_000]).unwrap();
    assert_eq!(d.usage("c").await.unwrap(), written);
    d.view("v", "c").await.unwrap();
    assert_eq!(d.usage("v").await.unwrap(), (0, 0));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directories_have_containerds_modes_and_the_parents_owner() {
    let mut d = Daemon::start().await;
    let m = d.prepare("preparing", "").await.unwrap();
    let fs = bind_source(&m);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&fs), 0o755, "the root a container sees");
    assert_eq!(mode(fs.parent().unwrap()), 0o700);
    assert_eq!(mode(&fs.parent().unwrap().join("work")), 0o711);
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        println!("skipped: the owner check needs root (chown)");
        d.stop().await;
        return;
    }
    std::os::unix::fs::chown(&fs, Some(1000), Some(1001)).unwrap();
    d.commit("base", "preparing").await.unwrap();
    let child = upper(&d.prepare("child", "base").await.unwrap());
    let m = std::fs::metadata(&child).unwrap();
    assert_eq!((m.uid(), m.gid()), (1000, 1001));
    let view = d.view("view", "base").await.unwrap();
    assert_eq!(bind_source(&view), fs, "a view of one layer binds it");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_with_odd_characters_round_trip() {
    let mut d = Daemon::start().await;
    let long = "k".repeat(2000);
    let keys = [
        "/leading/slash/and/more",
        "with space",
        "comma,and=equals",
        "quote\"and\\backslash",
        "ünïcødé-名前",
        "line\nbreak",
        "..",
        "123",
        long.as_str(),
    ];
    for key in keys {
        let parent = format!("{key}-committed");
        d.prepare(&format!("{key}-active"), "").await.unwrap();
        d.commit(&parent, &format!("{key}-active")).await.unwrap();
        d.prepare(key, &parent).await.unwrap();
        let info = d.stat(key).await.unwrap();
        assert_eq!(
            (info.name.as_str(), info.parent.as_str()),
            (key, parent.as_str())
        );
        // Rust's quoting of these is a Go string literal too.
        let quoted = format!("name=={key:?}");
        assert_eq!(d.names(&[&quoted]).await, [key.to_owned()], "{quoted}");
        d.commit(&format!("{key}-2"), key).await.unwrap();
        d.remove(&format!("{key}-2")).await.unwrap();
        d.remove(&parent).await.unwrap();
    }
    assert!(d.names(&[]).await.is_empty());
    refused(
        d.prepare("", "").await,
        Code::InvalidArgument,
        "empty snapshot key: invalid argument",
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_prepare_leaves_no_snapshot() {
    let mut d = Daemon::start().await;
    let probe = bind_source(&d.prepare("probe", "").await.unwrap());
    let id: u64 = probe
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .unwrap();
    // Files where the next snapshots' directories would go: their Prepares fail.
    let dir = d.snapshots_dir();
    for next in id + 1..id + 20 {
        std::fs::write(dir.join(next.to_string()), "in the way").unwrap();
    }
    let failed = d.prepare("x", "").await;
    assert!(failed.is_err(), "{failed:?}");
    refused(
        d.stat("x").await,
        Code::NotFound,
        "snapshot does not exist: not found",
    );
    assert_eq!(d.names(&[]).await, ["probe"]);
    // Cleanup removes what no snapshot owns, files and directories of any name.
    std::fs::create_dir_all(dir.join("new-123/fs")).unwrap();
    std::fs::create_dir_all(dir.join(format!("0{id}"))).unwrap();
    d.cleanup().await.unwrap();
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left, [id.to_string()], "only the probe's directory is kept");
    assert!(probe.is_dir());
    d.prepare("x", "").await.unwrap();
    d.stop().await;
}

//! Chain ids: the names containerd gives committed layer snapshots.
//!
//! A chain id names a layer together with every layer below it, so two images that share a
//! base share its snapshots. The rule is the OCI image spec's: the first layer's chain id is
//! its diff id, and each next one is `sha256(parent_chain + " " + diff_id)`. This module only
//! computes names; it never talks to a snapshotter.

use brisk_blobcache::Digest;

/// The chain id of every prefix of `diff_ids`: element `i` names layers `0..=i`.
pub(crate) fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut out: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match out.last() {
            None => *diff_id,
            Some(parent) => Digest::sha256(format!("{parent} {diff_id}").as_bytes()),
        };
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Digest {
        s.parse().unwrap()
    }

    #[test]
    fn chain_ids_match_values_computed_with_sha256sum() {
        // The diff ids are sha256("a"), sha256("b") and sha256("c"); the expected values come
        // from `printf '%s %s' PARENT DIFF_ID | sha256sum` in a shell.
        let diff_ids = [
            d("sha256:ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb"),
            d("sha256:3e23e8160039594a33894f6564e1b1348bbd7a0088d42c4acb73eeaed59c009d"),
            d("sha256:2e7d2c03a9507ae265ecf5b5356885a53393a2029d241394997265a1a25aefc6"),
        ];
        assert_eq!(
            chain_ids(&diff_ids),
            [
                diff_ids[0],
                d("sha256:51c0c8ace48498d6f5fee6b0592cc06f2da0f3cbe09c5a34a97dce85c3889676"),
                d("sha256:2fce7f8ce91bcf0a1428b36e1024639fdbd9469eea762dba98aa749631885106"),
            ]
        );
    }

    #[test]
    fn no_layers_means_no_chain() {
        assert!(chain_ids(&[]).is_empty());
    }
}

//! Properties of teleport's pure parts: checked paths over arbitrary strings, deltas that
//! turn one random tree into another, the three-way merge, and the decoders of teleport's
//! bridge requests and blob socket messages over arbitrary bytes.

use cloud_protocol::blobs::{self, Blob, BlobAnswer, BlobMessage, BlobReply, BlobRequest};
use cloud_protocol::teleport::{
    merge, Change, ContentId, Delta, Entry, EntryKind, Manifest, RelPath, TeleportReply,
    TeleportRequest,
};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;

/// Strings made mostly of the characters paths are made of, and the ones they may not
/// hold.
fn path_like() -> impl Strategy<Value = String> {
    vec(
        prop_oneof![
            4 => Just("a".to_owned()),
            2 => Just("/".to_owned()),
            2 => Just(".".to_owned()),
            1 => Just("..".to_owned()),
            1 => Just(".git".to_owned()),
            1 => Just(".GiT".to_owned()),
            1 => Just("\\".to_owned()),
            1 => Just("\0".to_owned()),
            1 => Just("C:".to_owned()),
            1 => Just("é".to_owned()),
            1 => any::<char>().prop_map(String::from),
        ],
        0..40,
    )
    .prop_map(|parts| parts.concat())
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![Just("a"), Just("b"), Just("c"), Just("a.b"), Just("a-b")].prop_map(String::from)
}

fn kind() -> impl Strategy<Value = EntryKind> {
    prop_oneof![
        Just(EntryKind::Dir),
        (any::<bool>(), 0u8..4).prop_map(|(executable, b)| EntryKind::File {
            executable,
            size: 1,
            content: ContentId::of(&[b]),
            chunks: Vec::new(),
        }),
        name().prop_map(|target| EntryKind::Symlink { target }),
    ]
}

/// A tree of up to three levels over a few names, so two trees share many paths. Like
/// every tree a scanner makes, each entry's parent is in it, as a directory.
fn manifest() -> impl Strategy<Value = Manifest> {
    btree_map(vec(name(), 1..4).prop_map(|c| c.join("/")), kind(), 0..24).prop_map(|m| {
        let mut tree = std::collections::BTreeMap::new();
        for (path, kind) in m {
            let path = RelPath::new(path).unwrap();
            let mut parent = path.parent();
            while let Some(dir) = parent {
                parent = dir.parent();
                tree.insert(dir, EntryKind::Dir);
            }
            tree.entry(path).or_insert(kind);
        }
        tree.into_iter()
            .map(|(path, kind)| Entry { path, kind })
            .collect()
    })
}

fn id() -> impl Strategy<Value = ContentId> {
    any::<[u8; 32]>().prop_map(ContentId)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// A path is accepted only when it is relative, normalised and free of what no writer
    /// may see, and then reads back as itself through both encodings.
    #[test]
    fn paths_are_accepted_only_when_safe(raw in path_like()) {
        match RelPath::new(raw.clone()) {
            Ok(path) => {
                prop_assert!(!raw.is_empty() && !raw.starts_with('/'));
                prop_assert!(!raw.contains('\0') && !raw.contains('\\'));
                for component in raw.split('/') {
                    prop_assert!(!component.is_empty() && component != "." && component != "..");
                    prop_assert!(!component.eq_ignore_ascii_case(".git"));
                }
                let bytes = postcard::to_allocvec(&path).unwrap();
                prop_assert_eq!(postcard::from_bytes::<RelPath>(&bytes).unwrap(), path.clone());
                let json = serde_json::to_string(&path).unwrap();
                prop_assert_eq!(serde_json::from_str::<RelPath>(&json).unwrap(), path);
            }
            Err(_) => {
                // Refused when built, refused when decoded.
                let bytes = postcard::to_allocvec(&raw).unwrap();
                prop_assert!(postcard::from_bytes::<RelPath>(&bytes).is_err());
            }
        }
    }

    /// The delta from one tree to another turns the first into the second.
    #[test]
    fn a_delta_turns_one_tree_into_the_other(old in manifest(), new in manifest()) {
        let delta = old.diff(&new);
        let mut applied = old.clone();
        applied.apply(&delta);
        prop_assert_eq!(&applied, &new);
        prop_assert!(applied.check_well_formed().is_ok());
        prop_assert!(old.diff(&old).is_empty());
        // Removals first, then puts with every parent before its children.
        let first_put = delta.changes.iter().position(|c| matches!(c, Change::Put(_)));
        if let Some(at) = first_put {
            prop_assert!(delta.changes[at..].iter().all(|c| matches!(c, Change::Put(_))));
        }
    }

    /// Merging with no local change takes the remote tree whole; merging a remote side
    /// that did not change takes nothing; a conflict is only ever a path both changed.
    #[test]
    fn merges_take_what_only_one_side_changed(
        base in manifest(),
        local in manifest(),
        remote in manifest(),
    ) {
        let untouched = merge(&base, &base, &remote);
        prop_assert!(untouched.conflicts.is_empty());
        let mut taken = base.clone();
        taken.apply(&untouched.apply);
        prop_assert_eq!(&taken, &remote);

        let nothing = merge(&base, &local, &base);
        prop_assert!(nothing.apply.is_empty() && nothing.conflicts.is_empty());

        let both = merge(&base, &local, &remote);
        for (path, _) in &both.conflicts {
            prop_assert!(base.get(path) != remote.get(path) || remote.get(path).is_none());
        }
        for change in &both.apply.changes {
            // Never over a path the local side changed.
            match change {
                Change::Put(entry) => prop_assert_eq!(base.get(&entry.path), local.get(&entry.path)),
                Change::Remove(path) => {
                    prop_assert!(base.under(path).all(|(p, k)| local.get(p) == Some(k)));
                    prop_assert!(local.under(path).all(|(p, k)| base.get(p) == Some(k)));
                }
            }
        }
    }

    /// Arbitrary bytes are a teleport request, a reply, a blob message or a clean error.
    #[test]
    fn decoders_survive_arbitrary_bytes(bytes in vec(any::<u8>(), 0..4096)) {
        if let Ok(value) = postcard::from_bytes::<TeleportRequest>(&bytes) {
            let again = postcard::to_allocvec(&value).unwrap();
            prop_assert_eq!(postcard::from_bytes::<TeleportRequest>(&again).unwrap(), value);
        }
        if let Ok(value) = postcard::from_bytes::<TeleportReply>(&bytes) {
            let again = postcard::to_allocvec(&value).unwrap();
            prop_assert_eq!(postcard::from_bytes::<TeleportReply>(&again).unwrap(), value);
        }
        if let Ok(value) = blobs::decode::<BlobMessage>(&bytes) {
            prop_assert_eq!(blobs::decode::<BlobMessage>(&blobs::encode(&value).unwrap()).unwrap(), value);
        }
        // Decoded in place, the same message or the same refusal.
        prop_assert_eq!(
            blobs::decode_ref(&bytes).map(|m| m.to_owned()).ok(),
            blobs::decode::<BlobMessage>(&bytes).ok()
        );
        if let Ok(value) = blobs::decode::<BlobReply>(&bytes) {
            prop_assert_eq!(blobs::decode::<BlobReply>(&blobs::encode(&value).unwrap()).unwrap(), value);
        }
    }

    /// Valid messages round-trip, and cut short they are refused, not read as others.
    #[test]
    fn messages_round_trip(
        old in manifest(),
        new in manifest(),
        ids in vec(id(), 0..8),
        data in vec(any::<u8>(), 0..64),
        cut in any::<prop::sample::Index>(),
    ) {
        let delta: Delta = old.diff(&new);
        let requests = [
            TeleportRequest::Lacks { session: "s-1".into(), ids: ids.clone() },
            TeleportRequest::Commit { session: "s-1".into(), base: 3, delta, git: None },
            TeleportRequest::Changes { session: "s-1".into(), since: 2 },
        ];
        for request in requests {
            let bytes = postcard::to_allocvec(&request).unwrap();
            prop_assert_eq!(postcard::from_bytes::<TeleportRequest>(&bytes).unwrap(), request.clone());
            let short = &bytes[..cut.index(bytes.len())];
            prop_assert!(postcard::from_bytes::<TeleportRequest>(short).is_err());
        }
        let blob = Blob { id: ContentId::of(&data), bytes: data };
        prop_assert!(blob.verify());
        let messages = [
            BlobMessage { id: 1, request: BlobRequest::Put { session: "s".into(), blobs: vec![blob.clone()] } },
            BlobMessage { id: 300, request: BlobRequest::PutFiles { session: "s".into(), blobs: vec![blob.clone(), blob.clone()] } },
            BlobMessage { id: 2, request: BlobRequest::Get { session: "s".into(), ids: ids.clone() } },
        ];
        for message in messages {
            let bytes = blobs::encode(&message).unwrap();
            prop_assert_eq!(blobs::decode::<BlobMessage>(&bytes).unwrap(), message.clone());
            prop_assert_eq!(blobs::decode_ref(&bytes).unwrap().to_owned(), message);
            let short = &bytes[..cut.index(bytes.len())];
            prop_assert!(blobs::decode_ref(short).is_err());
        }
        let reply = BlobReply { id: 1, result: Ok(BlobAnswer::Blobs { blobs: vec![blob], missing: ids }) };
        prop_assert_eq!(blobs::decode::<BlobReply>(&blobs::encode(&reply).unwrap()).unwrap(), reply);
    }
}

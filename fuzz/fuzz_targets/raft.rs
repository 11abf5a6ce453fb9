//! Any bytes as what a peer holding the cluster secret sends: the Raft
//! payloads and forwarded commands decode without a panic or a stack
//! overflow (a nested batch of any depth), and whatever decodes encodes to
//! bytes that decode to the same encoding again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::Vote;
use serde::de::DeserializeOwned;
use serde::Serialize;
use skein_queue::{Command, NodeId, SnapshotMeta, TypeConfig};

fn round_trip<T: Serialize + DeserializeOwned>(data: &[u8]) {
    if let Ok(v) = postcard::from_bytes::<T>(data) {
        let once = postcard::to_stdvec(&v).expect("a decoded value encodes");
        let back: T = postcard::from_bytes(&once).expect("its encoding decodes");
        let twice = postcard::to_stdvec(&back).expect("and encodes again");
        assert_eq!(once, twice);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    match kind % 5 {
        0 => round_trip::<AppendEntriesRequest<TypeConfig>>(rest),
        1 => round_trip::<VoteRequest<NodeId>>(rest),
        2 => round_trip::<Command>(rest),
        3 => round_trip::<SnapshotMeta>(rest),
        _ => round_trip::<Vote<NodeId>>(rest),
    }
});

//! Storage tests: openraft's conformance suite, restarts, snapshots, and a
//! model test that mixes random commands with reopening the store.

use std::collections::BTreeMap;

use bytes::Bytes;
use openraft::storage::{RaftLogReader, RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, EntryPayload, RaftSnapshotBuilder, StorageError};
use skein_smtp::{MailParams, Mailbox, RcptParams, ReversePath};
use tempfile::TempDir;

use super::*;
use crate::*;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError<NodeId>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path()).expect("open store");
        Ok((dir, s.log, s.state_machine))
    }
}

#[test]
fn openraft_storage_conformance_suite() {
    Suite::test_all(Builder).expect("suite");
}

fn log_id(index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(1, 1), index)
}

fn entry(index: u64, req: Request) -> Entry {
    Entry {
        log_id: log_id(index),
        payload: EntryPayload::Normal(req),
    }
}

fn enqueue(id: u128, body: &'static [u8]) -> Request {
    Request {
        now: 1000 + id as u64,
        cmd: Command::Enqueue(NewMessage {
            id: MessageId(id),
            sender: ReversePath::Null,
            recipients: vec![NewRecipient {
                address: Mailbox::parse("rcpt@example.org").unwrap(),
                params: RcptParams::default(),
            }],
            params: MailParams::default(),
            body: Bytes::from_static(body),
            owner: 1,
            lease_ms: 30_000,
        }),
    }
}

fn deliver(id: u128) -> Request {
    Request {
        now: 5000,
        cmd: Command::Report {
            notices: vec![],
            node: 1,
            outcomes: vec![Outcome {
                id: MessageId(id),
                recipients: vec![(
                    0,
                    RcptOutcome::Delivered {
                        reply: "250 ok".into(),
                    },
                )],
                retry_after_ms: 0,
            }],
        },
    }
}

/// Appends through the real callback path and waits for the flusher to
/// report the entries durable.
async fn append(log: &mut LogStore, entries: Vec<Entry>) {
    log.blocking_append(entries).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn applied_state_and_bodies_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = open(dir.path()).unwrap();
        s.state_machine
            .apply(vec![
                entry(1, enqueue(1, b"one")),
                entry(2, enqueue(2, b"two")),
                entry(3, deliver(1)),
            ])
            .await
            .unwrap();
        assert_eq!(s.reader.read().len(), 1);
        append(&mut s.log, vec![entry(1, enqueue(1, b"one"))]).await;
    }
    let mut s = open(dir.path()).unwrap();
    let (applied, _) = s.state_machine.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(3)));
    assert_eq!(s.reader.read().len(), 1);
    assert_eq!(
        s.reader.body(&MessageId(2)).unwrap().as_deref(),
        Some(&b"two"[..])
    );
    assert_eq!(
        s.reader.body(&MessageId(1)).unwrap(),
        None,
        "delivered body is gone"
    );
    let entries = s.log.try_get_log_entries(1..2).await.unwrap();
    assert_eq!(entries.len(), 1);
}

/// A snapshot of `s`, built now (and so its current one).
async fn build_snapshot(s: &mut Stores) -> openraft::storage::Snapshot<TypeConfig> {
    s.state_machine
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap()
}

/// `a`'s current snapshot, streamed into `b` and installed there.
async fn install_current_snapshot(a: &mut Stores, b: &mut Stores) {
    let mut recv = b.state_machine.begin_receiving_snapshot().await.unwrap();
    let mut src = a
        .state_machine
        .get_current_snapshot()
        .await
        .unwrap()
        .unwrap();
    tokio::io::copy(&mut src.snapshot, &mut *recv)
        .await
        .unwrap();
    b.state_machine
        .install_snapshot(&src.meta, recv)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_carries_messages_and_bodies_to_another_store() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = open(a_dir.path()).unwrap();
    let mut b = open(b_dir.path()).unwrap();
    a.state_machine
        .apply(vec![
            entry(1, enqueue(1, b"first body")),
            entry(2, enqueue(2, b"second body")),
        ])
        .await
        .unwrap();
    let mut builder = a.state_machine.get_snapshot_builder().await;
    // Deleting a message while the builder runs must not take its body away.
    a.state_machine
        .apply(vec![entry(3, deliver(1))])
        .await
        .unwrap();
    let snap = builder.build_snapshot().await.unwrap();
    assert_eq!(snap.meta.last_log_id, Some(log_id(2)));
    // Once no builder runs, the deferred body goes too.
    a.state_machine
        .apply(vec![entry(4, deliver(99))])
        .await
        .unwrap();
    assert_eq!(a.reader.body(&MessageId(1)).unwrap(), None);

    install_current_snapshot(&mut a, &mut b).await;

    let (applied, _) = b.state_machine.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(2)));
    assert_eq!(b.reader.read().len(), 2);
    assert_eq!(
        b.reader.body(&MessageId(1)).unwrap().as_deref(),
        Some(&b"first body"[..])
    );
    assert_eq!(b.reader.applied(), Some(log_id(2)));
    // The installed snapshot became b's own current one, and survives reopen.
    drop(b);
    let mut b = open(b_dir.path()).unwrap();
    assert_eq!(b.reader.read().len(), 2);
    let cur = b
        .state_machine
        .get_current_snapshot()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cur.meta.last_log_id, Some(log_id(2)));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_snapshot_is_refused_and_the_old_state_kept() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = open(a_dir.path()).unwrap();
    let mut b = open(b_dir.path()).unwrap();
    a.state_machine
        .apply(vec![entry(1, enqueue(1, b"body"))])
        .await
        .unwrap();
    b.state_machine
        .apply(vec![entry(1, enqueue(7, b"mine"))])
        .await
        .unwrap();
    let snap = build_snapshot(&mut a).await;
    let path = a_dir.path().join("snapshots").join("current.snap");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 6] ^= 0xFF;
    let mut recv = b.state_machine.begin_receiving_snapshot().await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut *recv, &bytes)
        .await
        .unwrap();
    assert!(b
        .state_machine
        .install_snapshot(&snap.meta, recv)
        .await
        .is_err());
    assert!(b.reader.read().get(&MessageId(7)).is_some());
    drop(b);
    let b = open(b_dir.path()).unwrap();
    assert!(b.reader.read().get(&MessageId(7)).is_some());
}

/// sled-style model test: random commands appended to the log and applied
/// to the store, and applied to a plain `QueueState`, with reopens mixed
/// in; after each reopen the stored queue equals the model, and after every
/// step each live message reads its own body (ids are reused, so a message
/// removed and queued again between two saves must not read the old one).
#[tokio::test(flavor = "multi_thread")]
async fn random_commands_with_reopens_match_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut stores = Some(open(dir.path()).unwrap());
    let mut model = QueueState::new();
    let mut bodies: BTreeMap<MessageId, Vec<u8>> = BTreeMap::new();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut index = 0;
    for step in 0..600 {
        let r = next();
        let now = 1000 + step * 250;
        let req = match r % 6 {
            0 | 1 => {
                let id = (next() % 64) as u128;
                let body = format!("body {id} {step}").into_bytes();
                if model.get(&MessageId(id)).is_none() {
                    bodies.insert(MessageId(id), body.clone());
                }
                let mut e = enqueue(id, b"");
                if let Command::Enqueue(m) = &mut e.cmd {
                    m.body = Bytes::from(body);
                }
                Request { now, cmd: e.cmd }
            }
            2 => Request {
                now,
                cmd: Command::Claim {
                    node: 1 + next() % 3,
                    max: 4,
                    lease_ms: 2000,
                },
            },
            3 => {
                let ids: Vec<MessageId> = model.messages().map(|m| m.id).take(3).collect();
                Request {
                    now,
                    cmd: Command::Report {
                        notices: vec![],
                        node: 1 + next() % 3,
                        outcomes: ids
                            .iter()
                            .map(|id| Outcome {
                                id: *id,
                                recipients: vec![(
                                    0,
                                    if next() % 2 == 0 {
                                        RcptOutcome::Delivered {
                                            reply: "250".into(),
                                        }
                                    } else {
                                        RcptOutcome::Deferred {
                                            reply: "451".into(),
                                        }
                                    },
                                )],
                                retry_after_ms: 1000,
                            })
                            .collect(),
                    },
                }
            }
            4 => Request {
                now,
                cmd: Command::Admin(AdminCommand::Hold(MessageId((next() % 64) as u128))),
            },
            _ => Request {
                now,
                cmd: Command::Admin(AdminCommand::RetryNow(None)),
            },
        };
        index += 1;
        model.apply(&req, &mut crate::state::Touched::default());
        let s = stores.as_mut().unwrap();
        // In the log first, as openraft does: its bodies are the log's, and
        // the state is saved in batches, not at each apply.
        append(&mut s.log, vec![entry(index, req.clone())]).await;
        s.state_machine
            .apply(vec![entry(index, req)])
            .await
            .unwrap();
        if next() % 50 == 0 {
            // Close the database before opening it again.
            drop(stores.take());
            stores = Some(open(dir.path()).unwrap());
            let s = stores.as_ref().unwrap();
            assert_eq!(*s.reader.read(), model, "after reopen at step {step}");
            for m in model.messages() {
                assert_eq!(
                    s.reader.body(&m.id).unwrap().as_deref(),
                    Some(&bodies[&m.id][..])
                );
            }
        }
        for id in bodies.keys().copied().collect::<Vec<_>>() {
            if model.get(&id).is_none() {
                bodies.remove(&id);
            }
        }
        // Between saves too, every queued message reads its own body.
        let s = stores.as_ref().unwrap();
        for m in model.messages() {
            assert_eq!(
                s.reader.body(&m.id).unwrap().as_deref(),
                Some(&bodies[&m.id][..]),
                "{} at step {step}",
                m.id
            );
        }
    }
}

/// Bodies and log entries larger than a chunk come back whole, in order,
/// and truncation and purging remove every chunk of an entry.
#[tokio::test(flavor = "multi_thread")]
async fn large_bodies_read_back_whole_through_truncate_and_purge() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path()).unwrap();
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let mut entries = Vec::new();
    for i in 1..=4u64 {
        let mut req = enqueue(i as u128, b"");
        if let Command::Enqueue(m) = &mut req.cmd {
            m.body = Bytes::from(big[..big.len() - i as usize * 1000].to_vec());
        }
        entries.push(entry(i, req));
    }
    s.log.blocking_append(entries.clone()).await.unwrap();
    s.state_machine.apply(entries.clone()).await.unwrap();

    let back = s.log.try_get_log_entries(1..=4).await.unwrap();
    assert_eq!(back, entries);
    assert_eq!(
        s.log.get_log_state().await.unwrap().last_log_id,
        Some(log_id(4))
    );
    assert_eq!(
        s.reader.body(&MessageId(2)).unwrap().unwrap().len(),
        big.len() - 2000
    );

    s.log.truncate(log_id(3)).await.unwrap();
    assert_eq!(
        s.log.try_get_log_entries(1..10).await.unwrap(),
        entries[..2]
    );
    s.log.purge(log_id(1)).await.unwrap();
    assert_eq!(
        s.log.try_get_log_entries(0..10).await.unwrap(),
        entries[1..2]
    );
    assert_eq!(
        s.log.get_log_state().await.unwrap().last_log_id,
        Some(log_id(2))
    );

    s.state_machine
        .apply(vec![entry(5, deliver(2))])
        .await
        .unwrap();
    assert_eq!(s.reader.body(&MessageId(2)).unwrap(), None);
    assert!(s.reader.body(&MessageId(3)).unwrap().is_some());
}

/// A backup holds every queued message and body; importing it into a fresh
/// store queues them again as they were, without their leases.
#[tokio::test(flavor = "multi_thread")]
async fn backup_and_import_carry_the_queue_over() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = open(a_dir.path()).unwrap();
    a.state_machine
        .apply(vec![
            entry(1, enqueue(1, b"one")),
            entry(2, enqueue(2, b"two")),
            entry(3, enqueue(3, b"three")),
            entry(4, deliver(2)),
        ])
        .await
        .unwrap();
    let path = a_dir.path().join("backup.snap");
    assert_eq!(a.reader.backup(&path).unwrap(), 2);

    let mut b = open(b_dir.path()).unwrap();
    let (_, mut r) = snapshot::SnapshotReader::open(std::io::BufReader::new(
        std::fs::File::open(&path).unwrap(),
    ))
    .unwrap();
    let mut index = 0;
    while let Some((m, body)) = r.next_message().unwrap() {
        index += 1;
        let cmd = Command::Admin(AdminCommand::Import {
            message: Box::new(m),
            body: body.into(),
        });
        let out = b
            .state_machine
            .apply(vec![entry(
                index,
                Request {
                    now: 9000,
                    cmd: cmd.clone(),
                },
            )])
            .await
            .unwrap();
        assert_eq!(out, vec![Response::Changed(1)]);
        // Importing twice changes nothing.
        index += 1;
        let out = b
            .state_machine
            .apply(vec![entry(index, Request { now: 9000, cmd })])
            .await
            .unwrap();
        assert_eq!(out, vec![Response::Changed(0)]);
    }
    let (sa, sb) = (a.reader.read().clone(), b.reader.read().clone());
    assert_eq!(sb.len(), 2);
    for m in sa.messages() {
        let n = sb.get(&m.id).unwrap();
        assert_eq!(n.lease, None);
        assert_eq!(
            (&n.recipients, n.attempts, n.next_attempt),
            (&m.recipients, m.attempts, m.next_attempt)
        );
        assert_eq!(b.reader.body(&m.id).unwrap(), a.reader.body(&m.id).unwrap());
    }
}

fn body_of(len: usize, seed: u128) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u128 * 31 + seed) as u8)
            .collect::<Vec<u8>>(),
    )
}

fn enqueue_body(id: u128, body: Bytes) -> Request {
    let mut req = enqueue(id, b"");
    if let Command::Enqueue(m) = &mut req.cmd {
        m.body = body;
    }
    req
}

/// Wait (with a deadline) until the store gives its body segments back.
async fn until_segments(s: &Stores, want: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while s.reader.body_segments() > want {
        assert!(
            std::time::Instant::now() < deadline,
            "{} body segments left, want {want}",
            s.reader.body_segments()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The soak property in small: once every message is delivered and the log
/// purged, the body segments are unlinked and the data directory comes back
/// to about its size when empty, however much mail passed through.
#[tokio::test(flavor = "multi_thread")]
async fn space_comes_back_once_the_queue_drains_and_the_log_is_purged() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path()).unwrap();
    let empty = s.reader.disk_size();
    let mut index = 0;
    let n: u128 = 4000; // 40 MB of 10 KB bodies: several segments.
    for chunk in (1..=n).collect::<Vec<_>>().chunks(200) {
        let entries: Vec<Entry> = chunk
            .iter()
            .map(|id| {
                index += 1;
                entry(index, enqueue_body(*id, body_of(10_000, *id)))
            })
            .collect();
        append(&mut s.log, entries.clone()).await;
        s.state_machine.apply(entries).await.unwrap();
    }
    assert!(s.reader.body_segments() >= 3);
    let full = s.reader.disk_size();
    assert!(full > 40_000_000, "{full} bytes on disk holding 40 MB");
    // Each body is written once: bodies, not sled, hold the bulk.
    assert_eq!(
        s.reader.body(&MessageId(77)).unwrap().unwrap(),
        body_of(10_000, 77)
    );

    // Deliver everything; the log still names the bodies, so they stay.
    for id in 1..=n {
        index += 1;
        let e = vec![entry(index, deliver(id))];
        append(&mut s.log, e.clone()).await;
        s.state_machine.apply(e).await.unwrap();
    }
    assert_eq!(s.reader.read().len(), 0);
    let back = s.log.try_get_log_entries(77..78).await.unwrap();
    assert_eq!(back, vec![entry(77, enqueue_body(77, body_of(10_000, 77)))]);

    // Purge the log: now nothing names them.
    s.log.purge(log_id(index)).await.unwrap();
    until_segments(&s, 1).await;
    let end = s.reader.disk_size();
    assert!(
        end < empty + 16_000_000,
        "data dir {empty} bytes empty, {full} full, {end} drained"
    );
    drop(s);
    // And the store reopens whole, on a fresh segment.
    let s = open(dir.path()).unwrap();
    assert_eq!(s.reader.read().len(), 0);
    assert!(s.reader.body_segments() <= 2);
}

/// A body a log entry still names survives its message's delivery; a body
/// a queued message names survives the purge of its log entry, and a reopen.
#[tokio::test(flavor = "multi_thread")]
async fn a_body_lives_while_the_log_or_the_queue_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path()).unwrap();
    let mut entries = Vec::new();
    for id in 1..=1700u128 {
        entries.push(entry(id as u64, enqueue_body(id, body_of(10_000, id))));
    }
    append(&mut s.log, entries.clone()).await;
    s.state_machine.apply(entries).await.unwrap();
    // Message 1 (first segment) stays queued; the rest are delivered.
    let mut index = 1700;
    for id in 2..=1700u128 {
        index += 1;
        let e = vec![entry(index, deliver(id))];
        append(&mut s.log, e.clone()).await;
        s.state_machine.apply(e).await.unwrap();
    }
    s.log.purge(log_id(index)).await.unwrap();
    // Segments whose every body is gone go; the first one stays for message 1.
    until_segments(&s, 2).await;
    assert_eq!(
        s.reader.body(&MessageId(1)).unwrap().unwrap(),
        body_of(10_000, 1)
    );
    drop(s);
    let s = open(dir.path()).unwrap();
    assert_eq!(
        s.reader.body(&MessageId(1)).unwrap().unwrap(),
        body_of(10_000, 1)
    );
    assert_eq!(s.reader.body(&MessageId(2)).unwrap(), None);
}

/// A delivery status notification queued by a report keeps its own body,
/// on the node that reported and on every replica applying the report.
#[tokio::test(flavor = "multi_thread")]
async fn a_notice_enqueued_by_a_report_has_its_body() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path()).unwrap();
    let mut fail = deliver(1);
    if let Command::Report {
        outcomes, notices, ..
    } = &mut fail.cmd
    {
        outcomes[0].recipients[0].1 = RcptOutcome::Failed {
            reply: "550 no".into(),
        };
        let Command::Enqueue(mut dsn) = enqueue_body(2, Bytes::from_static(b"bounce")).cmd else {
            unreachable!()
        };
        dsn.sender = ReversePath::Null;
        notices.push(Notice {
            about: MessageId(1),
            kind: NoticeKind::Failure,
            message: dsn,
        });
    }
    let entries = vec![entry(1, enqueue(1, b"orig")), entry(2, fail)];
    append(&mut s.log, entries.clone()).await;
    s.state_machine.apply(entries.clone()).await.unwrap();
    assert_eq!(s.reader.read().len(), 1);
    assert_eq!(
        s.reader.body(&MessageId(2)).unwrap().as_deref(),
        Some(&b"bounce"[..])
    );
    assert_eq!(s.log.try_get_log_entries(1..3).await.unwrap(), entries);
    // A snapshot (which reads every queued body) builds.
    build_snapshot(&mut s).await;
}

/// The segment file and offset a log entry's body was written at.
fn body_place(s: &Stores, index: u64) -> (std::path::PathBuf, u64, usize) {
    let r = super::log::stored_refs(&s.log.mem(), index).unwrap()[0];
    let path = s
        .reader
        .data_dir()
        .join("bodies")
        .join(format!("{:08}.seg", r.seg));
    (path, r.off, r.len as usize)
}

/// Overwrite `len` bytes at `off` of the file at `path`.
fn damage(path: &std::path::Path, off: u64, len: usize, with: u8) {
    let mut bytes = std::fs::read(path).unwrap();
    for b in &mut bytes[off as usize..off as usize + len] {
        *b = with;
    }
    std::fs::write(path, bytes).unwrap();
}

/// After a power cut, a log record may be on disk without its bodies (they
/// were never reported durable: the pages of a file reach the disk in any
/// order until a sync). The store cuts its log before the first such entry
/// instead of serving a damaged body, and it stays cut.
#[tokio::test(flavor = "multi_thread")]
async fn log_entries_whose_bodies_never_reached_the_disk_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let place = {
        let mut s = open(dir.path()).unwrap();
        let entries: Vec<Entry> = (1..=6u64)
            .map(|i| entry(i, enqueue_body(i as u128, body_of(5000, i as u128))))
            .collect();
        append(&mut s.log, entries).await;
        body_place(&s, 4)
    };
    // Damage the body of entry 4 the way a lost page would.
    damage(&place.0, place.1, place.2, 0);

    for _ in 0..2 {
        let mut s = open(dir.path()).unwrap();
        assert_eq!(
            s.log.get_log_state().await.unwrap().last_log_id,
            Some(log_id(3))
        );
        let back = s.log.try_get_log_entries(1..10).await.unwrap();
        assert_eq!(back.len(), 3);
        assert_eq!(back[2], entry(3, enqueue_body(3, body_of(5000, 3))));
    }
}

/// A crash can keep a later segment's records and not an earlier one's
/// tail (nothing was synced after either). The log ends where the first
/// record is missing; the records past the hole are dead for good, so the
/// entries appended after the reopen read back in order, and a truncate
/// holds across a reopen.
#[tokio::test(flavor = "multi_thread")]
async fn records_past_a_hole_in_the_log_stay_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let e = |i: u64| entry(i, enqueue_body(i as u128, body_of(3000, i as u128)));
    let place = {
        let mut s = open(dir.path()).unwrap();
        append(&mut s.log, (1..=5).map(e).collect()).await;
        body_place(&s, 4)
    };
    {
        // A new segment: the next run's, or the same run's after a roll.
        // The queue names its bodies, so it stays whatever the log does.
        let mut s = open(dir.path()).unwrap();
        append(&mut s.log, (6..=7).map(e).collect()).await;
        s.state_machine.apply((6..=7).map(e)).await.unwrap();
        s.reader.flush().unwrap();
    }
    // Entry 4's record torn: its header is gone (it sits right before its
    // one body).
    damage(&place.0, place.1 - 20, 20, 0);
    {
        let mut s = open(dir.path()).unwrap();
        let state = s.log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(log_id(3)));
        assert_eq!(s.log.try_get_log_entries(1..10).await.unwrap().len(), 3);
        append(&mut s.log, vec![entry(4, deliver(1)), e(5)]).await;
        s.log.truncate(log_id(5)).await.unwrap();
    }
    let mut s = open(dir.path()).unwrap();
    assert_eq!(
        s.log.get_log_state().await.unwrap().last_log_id,
        Some(log_id(4))
    );
    let back = s.log.try_get_log_entries(1..10).await.unwrap();
    let want: Vec<Entry> = (1..=3).map(e).chain([entry(4, deliver(1))]).collect();
    assert_eq!(back, want);
}

/// A data directory from before the log moved into the segments keeps it in
/// sled's `raft_log` tree, its bodies bare in segments without a header:
/// the first open moves the log over, and the entries read back whole.
#[tokio::test(flavor = "multi_thread")]
async fn a_log_kept_in_sled_moves_to_the_segments() {
    let dir = tempfile::tempdir().unwrap();
    let entries: Vec<Entry> = (1..=3u64)
        .map(|i| entry(i, enqueue_body(i as u128, body_of(2000, i as u128))))
        .collect();
    {
        std::fs::create_dir_all(dir.path().join("bodies")).unwrap();
        let mut seg = Vec::new();
        let db = open_db(&dir.path().join("db")).unwrap();
        let tree = db.open_tree(LOG_TREE).unwrap();
        for e in &entries {
            let mut e = e.clone();
            let mut refs = Vec::new();
            if let EntryPayload::Normal(req) = &mut e.payload {
                for b in req.cmd.bodies_mut() {
                    refs.push(BodyRef {
                        seg: 1,
                        off: seg.len() as u64,
                        len: b.len() as u32,
                        crc: crc32fast::hash(b),
                    });
                    seg.extend_from_slice(b);
                    *b = Bytes::new();
                }
            }
            let mut key = [0u8; 12];
            key[..8].copy_from_slice(&e.log_id.index.to_be_bytes());
            let v = postcard::to_stdvec(&super::log::StoredRef {
                entry: &e,
                bodies: &refs,
            })
            .unwrap();
            tree.insert(key, v).unwrap();
        }
        std::fs::write(dir.path().join("bodies").join("00000001.seg"), seg).unwrap();
        db.flush().unwrap();
    }
    for _ in 0..2 {
        let mut s = open(dir.path()).unwrap();
        assert_eq!(s.log.try_get_log_entries(1..4).await.unwrap(), entries);
        assert!(!s
            .reader
            .db
            .tree_names()
            .iter()
            .any(|n| n.as_ref() == LOG_TREE.as_bytes()));
    }
}

/// The bodies of a batched entry are each written once, read back in their
/// places, and stored for the messages that stay queued.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_entry_keeps_every_body_in_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path()).unwrap();
    let batch = Request {
        now: 2000,
        cmd: Command::Batch(vec![
            enqueue_body(1, body_of(3000, 1)).cmd,
            enqueue_body(2, body_of(4000, 2)).cmd,
            deliver(1).cmd,
            enqueue_body(3, body_of(5000, 3)).cmd,
        ]),
    };
    let entries = vec![entry(1, batch)];
    append(&mut s.log, entries.clone()).await;
    assert_eq!(s.log.try_get_log_entries(1..2).await.unwrap(), entries);
    let out = s.state_machine.apply(entries).await.unwrap();
    assert!(matches!(&out[0], Response::Batch(v) if v.len() == 4));
    assert_eq!(s.reader.body(&MessageId(1)).unwrap(), None);
    assert_eq!(
        s.reader.body(&MessageId(2)).unwrap().unwrap(),
        body_of(4000, 2)
    );
    assert_eq!(
        s.reader.body(&MessageId(3)).unwrap().unwrap(),
        body_of(5000, 3)
    );
    drop(s);
    let s = open(dir.path()).unwrap();
    assert_eq!(
        s.reader.body(&MessageId(3)).unwrap().unwrap(),
        body_of(5000, 3)
    );
}

/// Reopening, the body store knows its segments before any store has
/// counted the references in them: a settle in that window (the log
/// flusher's idle tick came there) must not take a segment the queue names.
#[test]
fn no_segment_goes_before_every_store_has_counted() {
    let dir = tempfile::tempdir().unwrap();
    let r = {
        let b = Bodies::open(dir.path()).unwrap();
        b.finish_open().unwrap();
        let r = b.append(b"a queued body").unwrap();
        b.sync().unwrap();
        r
    };
    // Segment 1 now holds a body that sled names; it is not the active one.
    let b = Bodies::open(dir.path()).unwrap();
    b.collect();
    b.settle(b.take_releases());
    b.retain(&r);
    b.finish_open().unwrap();
    assert_eq!(&b.read(&r).unwrap()[..], b"a queued body");
    // Once counted, a settle works as before: released, then gone.
    b.release(&r);
    b.settle(b.take_releases());
    assert!(b.read(&r).is_err(), "an unreferenced segment is unlinked");
}

fn seg_path(dir: &std::path::Path, n: u32) -> std::path::PathBuf {
    dir.join(format!("{n:08}.seg"))
}

/// Builds of 2026-12-01 made segments from spares of zeros, 16 MiB from the
/// start. The log's scan reads such a segment's records back and stops at
/// the zeros after them; a torn record in it is still found (what follows
/// is not read). New segments are plain files again, as long as what is in
/// them.
#[test]
fn a_segment_an_earlier_build_made_from_a_spare_reads_back_up_to_its_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let entry = |b: &Bodies, body: &[u8], meta: &[u8]| {
        let meta = meta.to_vec();
        b.append_record(bodies::KIND_ENTRY, &[body], true, move |_| Ok(meta))
            .unwrap()
    };
    {
        let b = Bodies::open(dir.path()).unwrap();
        b.finish_open().unwrap();
        entry(&b, b"first", b"meta 1");
        entry(&b, &[7u8; 100_000], b"meta 2");
        b.sync().unwrap();
        let size = std::fs::metadata(seg_path(dir.path(), 1)).unwrap().len();
        assert!(size < 110_000, "a new segment grows as written ({size} bytes)");
    }
    // Segment 1 as a spare-made one: zeros to 16 MiB after its records.
    let path = seg_path(dir.path(), 1);
    let end = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(bodies::SEGMENT_BYTES).unwrap();
    drop(f);
    {
        let b = Bodies::open(dir.path()).unwrap();
        let metas: Vec<Vec<u8>> = b.scan().unwrap().into_iter().map(|r| r.meta).collect();
        assert_eq!(metas, [b"meta 1".to_vec(), b"meta 2".to_vec()]);
    }
    // A crash tore the record after the second: the scan stops there too
    // (a header, then a length that runs into the zeros with a bad CRC).
    let mut torn = vec![b'S', b'K', bodies::KIND_ENTRY, 0];
    torn.extend_from_slice(&8u32.to_le_bytes());
    torn.extend_from_slice(&0u64.to_le_bytes());
    torn.extend_from_slice(&1u32.to_le_bytes());
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &torn, end).unwrap();
    drop(f);
    let b = Bodies::open(dir.path()).unwrap();
    assert_eq!(b.scan().unwrap().len(), 2);
}

/// A spare an earlier build put to use just before a crash can come back
/// under its spare name with records in it (the rename lost, the records
/// kept). An open removes every spare such a build left instead of using
/// it: the records in such a file never come back, and the new segment is
/// a new file.
#[test]
fn spares_an_earlier_build_left_are_removed_not_used() {
    let dir = tempfile::tempdir().unwrap();
    {
        let b = Bodies::open(dir.path()).unwrap();
        b.finish_open().unwrap();
        b.append_record(bodies::KIND_ENTRY, &[b"old body"], true, |_| {
            Ok(b"old record".to_vec())
        })
        .unwrap();
        b.sync().unwrap();
    }
    // Segment 1 (the one the open above rolled to) as a spare whose rename
    // a crash undid, full size like a spare, and a half-written one.
    let seg = seg_path(dir.path(), 1);
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(bodies::SEGMENT_BYTES).unwrap();
    drop(f);
    std::fs::rename(&seg, dir.path().join("spare.zero")).unwrap();
    std::fs::write(dir.path().join("spare.tmp"), b"half written").unwrap();
    let b = Bodies::open(dir.path()).unwrap();
    b.finish_open().unwrap();
    assert!(!dir.path().join("spare.tmp").exists());
    assert!(!dir.path().join("spare.zero").exists());
    assert!(
        b.scan().unwrap().is_empty(),
        "no record of the lost segment"
    );
    let size = std::fs::metadata(seg_path(dir.path(), 1)).unwrap().len();
    assert!(size < 4096, "segment 1 is a new file ({size} bytes)");
}

/// openraft reads fresh entries from the log's memory; they must be what a
/// read from disk gives, through truncation and re-appending at an index.
#[tokio::test(flavor = "multi_thread")]
async fn recent_entries_read_the_same_from_memory_and_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let entries: Vec<Entry> = (1..=5u64)
        .map(|i| entry(i, enqueue_body(i as u128, body_of(20_000, i as u128))))
        .collect();
    let mut s = open(dir.path()).unwrap();
    append(&mut s.log, entries.clone()).await;
    assert_eq!(s.log.try_get_log_entries(1..6).await.unwrap(), entries);
    s.log.truncate(log_id(4)).await.unwrap();
    let four = entry(4, enqueue_body(99, body_of(3000, 99)));
    append(&mut s.log, vec![four.clone()]).await;
    let memory = s.log.try_get_log_entries(1..5).await.unwrap();
    assert_eq!(memory[3], four);
    assert!(s.log.try_get_log_entries(5..6).await.unwrap().is_empty());
    drop(s);
    let mut s = open(dir.path()).unwrap();
    let disk = s.log.try_get_log_entries(1..5).await.unwrap();
    assert_eq!(memory, disk);
    assert_eq!(disk[..3], entries[..3]);
}

fn sts(domain: &str, expires: u64) -> Request {
    Request {
        now: 1,
        cmd: Command::SetStsPolicy(crate::StsPolicy {
            domain: domain.into(),
            id: "abc1".into(),
            mode: crate::StsMode::Enforce,
            mx: vec!["mx.example.org".into()],
            max_age: 86400,
            expires,
        }),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn mta_sts_policies_survive_reopen_and_travel_in_snapshots() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    {
        let mut a = open(a_dir.path()).unwrap();
        a.state_machine
            .apply(vec![
                entry(1, sts("example.org", 100)),
                entry(2, sts("example.net", 100)),
                // An older fetch arriving late does not undo a newer one.
                entry(3, sts("example.org", 50)),
            ])
            .await
            .unwrap();
    }
    let mut a = open(a_dir.path()).unwrap();
    assert_eq!(
        a.reader.read().sts_policy("example.org").unwrap().expires,
        100
    );
    assert_eq!(a.reader.read().sts_policies().count(), 2);

    build_snapshot(&mut a).await;
    let mut b = open(b_dir.path()).unwrap();
    install_current_snapshot(&mut a, &mut b).await;
    assert_eq!(b.reader.read().sts_policies().count(), 2);
    drop(b);
    let b = open(b_dir.path()).unwrap();
    assert_eq!(
        b.reader.read().sts_policy("example.net").unwrap().expires,
        100
    );
}

/// Copy a data directory as a crash would leave it: whatever the files
/// hold now, taken while the store is still open.
fn crash_image(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            crash_image(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// Applies are saved to the state tree in batches, not one by one: a crash
/// before the save loses nothing, because the log (durable before anything
/// is applied) holds every entry since, and applying them again makes the
/// same queue, the same bodies and the same history.
#[tokio::test(flavor = "multi_thread")]
async fn applies_not_yet_saved_come_back_from_the_log_after_a_crash() {
    let (dir, copy) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = open(dir.path()).unwrap();
    let first: Vec<Entry> = (1..=4)
        .map(|i| entry(i, enqueue_body(i as u128, body_of(2000, i as u128))))
        .collect();
    append(&mut a.log, first.clone()).await;
    a.state_machine.apply(first).await.unwrap();
    // A save, as before every snapshot: the tree now holds entries 1–4.
    a.reader.flush().unwrap();
    a.reader
        .shared
        .saver_paused
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let mut rest = vec![entry(5, deliver(1))];
    rest.extend((6..=9).map(|i| entry(i, enqueue_body(i as u128, body_of(3000, i as u128)))));
    rest.push(entry(10, deliver(6)));
    append(&mut a.log, rest.clone()).await;
    a.state_machine.apply(rest.clone()).await.unwrap();
    let want = a.reader.read().clone();
    assert_eq!(want.len(), 6);
    crash_image(dir.path(), copy.path());

    let mut b = open(copy.path()).unwrap();
    let (applied, _) = b.state_machine.applied_state().await.unwrap();
    assert_eq!(
        applied,
        Some(log_id(4)),
        "the crash image holds the state as of the last save"
    );
    assert_eq!(b.reader.read().len(), 4);
    // What openraft does on start: apply the log from there on.
    let again = b.log.try_get_log_entries(5..11).await.unwrap();
    assert_eq!(again, rest);
    b.state_machine.apply(again).await.unwrap();
    assert_eq!(*b.reader.read(), want);
    for m in want.messages() {
        let n = m.id.0;
        let len = if n <= 4 { 2000 } else { 3000 };
        assert_eq!(b.reader.body(&m.id).unwrap().unwrap(), body_of(len, n));
    }
    assert_eq!(b.reader.body(&MessageId(1)).unwrap(), None);
    let names = |s: &Stores, id| -> Vec<&'static str> {
        s.reader
            .history()
            .events(&MessageId(id))
            .unwrap()
            .iter()
            .map(|e| e.kind.name())
            .collect()
    };
    assert_eq!(names(&b, 6), ["accepted", "attempt", "delivered"]);
    assert_eq!(names(&b, 6), names(&a, 6));
    // And it all stays once saved and reopened.
    drop(b);
    let b = open(copy.path()).unwrap();
    assert_eq!(*b.reader.read(), want);
    assert_eq!(names(&b, 1), names(&a, 1));
}

/// The log is purged only behind a snapshot, and a snapshot is built only
/// after a save: so a crash after a purge finds the state tree holding
/// everything the purged entries did.
#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_saves_the_state_before_the_log_behind_it_is_purged() {
    let (dir, copy) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = open(dir.path()).unwrap();
    a.reader
        .shared
        .saver_paused
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let mut entries: Vec<Entry> = (1..=5)
        .map(|i| entry(i, enqueue_body(i as u128, body_of(1500, i as u128))))
        .collect();
    entries.push(entry(6, deliver(2)));
    append(&mut a.log, entries.clone()).await;
    a.state_machine.apply(entries).await.unwrap();
    let want = a.reader.read().clone();
    let snap = build_snapshot(&mut a).await;
    assert_eq!(snap.meta.last_log_id, Some(log_id(6)));
    // The purge point is on disk when the purge returns.
    a.log.purge(log_id(6)).await.unwrap();
    crash_image(dir.path(), copy.path());

    let mut b = open(copy.path()).unwrap();
    let (applied, _) = b.state_machine.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(6)));
    assert!(b.log.try_get_log_entries(1..7).await.unwrap().is_empty());
    assert_eq!(*b.reader.read(), want);
    for id in [1u128, 3, 4, 5] {
        assert_eq!(
            b.reader.body(&MessageId(id)).unwrap().unwrap(),
            body_of(1500, id)
        );
    }
}

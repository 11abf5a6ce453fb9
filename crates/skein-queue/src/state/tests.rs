use bytes::Bytes;
use skein_smtp::{MailParams, Mailbox, RcptParams, ReversePath};

use super::*;

const A: NodeId = 1;
const B: NodeId = 2;
const LEASE: u64 = 30_000;

fn mailbox(s: &str) -> Mailbox {
    Mailbox::parse(s).unwrap()
}

fn new_message(id: u128, owner: NodeId, rcpts: &[&str]) -> NewMessage {
    NewMessage {
        id: MessageId(id),
        sender: ReversePath::Mailbox(mailbox("from@example.net")),
        recipients: rcpts
            .iter()
            .map(|r| NewRecipient {
                address: mailbox(r),
                params: RcptParams::default(),
            })
            .collect(),
        params: MailParams::default(),
        body: Bytes::from_static(b"Subject: hi\r\n\r\nhello\r\n"),
        owner,
        lease_ms: LEASE,
    }
}

fn req(now: Millis, cmd: Command) -> Request {
    Request { now, cmd }
}

fn apply(s: &mut QueueState, now: Millis, cmd: Command) -> Response {
    s.apply(&req(now, cmd), &mut Touched::default())
}

fn delivered(idx: u32) -> (u32, RcptOutcome) {
    (
        idx,
        RcptOutcome::Delivered {
            reply: "250 ok".into(),
        },
    )
}

fn deferred(idx: u32) -> (u32, RcptOutcome) {
    (
        idx,
        RcptOutcome::Deferred {
            reply: "451 try later".into(),
        },
    )
}

fn report(
    s: &mut QueueState,
    now: Millis,
    node: NodeId,
    id: u128,
    rcpts: Vec<(u32, RcptOutcome)>,
    retry: u64,
) {
    apply(
        s,
        now,
        Command::Report {
            notices: vec![],
            node,
            outcomes: vec![Outcome {
                id: MessageId(id),
                recipients: rcpts,
                retry_after_ms: retry,
            }],
        },
    );
}

#[test]
fn enqueue_leases_to_the_owner_and_is_idempotent() {
    let mut s = QueueState::new();
    let r = apply(
        &mut s,
        1000,
        Command::Enqueue(new_message(1, A, &["a@example.org"])),
    );
    assert_eq!(r, Response::Enqueued { duplicate: false });
    let m = s.get(&MessageId(1)).unwrap();
    assert_eq!(
        m.lease,
        Some(Lease {
            node: A,
            until: 1000 + LEASE
        })
    );
    assert_eq!(m.state(1000), MessageState::Leased);
    assert_eq!(m.size, 22);

    let r = apply(
        &mut s,
        1001,
        Command::Enqueue(new_message(1, A, &["a@example.org"])),
    );
    assert_eq!(r, Response::Enqueued { duplicate: true });
    assert_eq!(s.len(), 1);
}

#[test]
fn claim_takes_only_due_unleased_mail_in_due_order() {
    let mut s = QueueState::new();
    apply(
        &mut s,
        1000,
        Command::Enqueue(new_message(1, A, &["a@x.org"])),
    );
    apply(
        &mut s,
        1000,
        Command::Enqueue(new_message(2, A, &["a@x.org"])),
    );
    // Still leased to A: nothing to claim.
    let r = apply(
        &mut s,
        2000,
        Command::Claim {
            node: B,
            max: 10,
            lease_ms: LEASE,
        },
    );
    assert_eq!(r, Response::Leased(vec![]));
    assert!(!s.has_claimable(2000));
    // A's leases lapse in cluster time: B takes both over.
    let after = 1000 + LEASE;
    assert!(s.has_claimable(after));
    let r = apply(
        &mut s,
        after,
        Command::Claim {
            node: B,
            max: 1,
            lease_ms: LEASE,
        },
    );
    assert_eq!(r, Response::Leased(vec![MessageId(1)]));
    let r = apply(
        &mut s,
        after,
        Command::Claim {
            node: B,
            max: 5,
            lease_ms: LEASE,
        },
    );
    assert_eq!(r, Response::Leased(vec![MessageId(2)]));
    assert_eq!(s.get(&MessageId(2)).unwrap().lease.unwrap().node, B);
}

#[test]
fn cluster_time_never_goes_back() {
    let mut s = QueueState::new();
    apply(
        &mut s,
        5000,
        Command::Claim {
            node: A,
            max: 1,
            lease_ms: LEASE,
        },
    );
    apply(
        &mut s,
        10,
        Command::Claim {
            node: A,
            max: 1,
            lease_ms: LEASE,
        },
    );
    assert_eq!(s.cluster_time(), 5000);
    // An entry stamped by a slow clock still leases relative to cluster time.
    apply(
        &mut s,
        10,
        Command::Enqueue(new_message(1, A, &["a@x.org"])),
    );
    assert_eq!(
        s.get(&MessageId(1)).unwrap().lease.unwrap().until,
        5000 + LEASE
    );
}

#[test]
fn delivered_mail_leaves_the_queue() {
    let mut s = QueueState::new();
    apply(
        &mut s,
        1000,
        Command::Enqueue(new_message(1, A, &["a@x.org", "b@y.org"])),
    );
    let mut t = Touched::default();
    s.apply(
        &req(
            1100,
            Command::Report {
                notices: vec![],
                node: A,
                outcomes: vec![Outcome {
                    id: MessageId(1),
                    recipients: vec![delivered(0), delivered(1)],
                    retry_after_ms: 60_000,
                }],
            },
        ),
        &mut t,
    );
    assert!(s.is_empty());
    assert_eq!(t.ids, vec![MessageId(1), MessageId(1)]);
}

#[test]
fn deferral_schedules_a_retry_and_keeps_the_error() {
    let mut s = QueueState::new();
    apply(
        &mut s,
        1000,
        Command::Enqueue(new_message(1, A, &["a@x.org", "b@y.org"])),
    );
    report(&mut s, 1100, A, 1, vec![delivered(0), deferred(1)], 60_000);
    let m = s.get(&MessageId(1)).unwrap();
    assert_eq!(m.lease, None);
    assert_eq!(m.attempts, 1);
    assert_eq!(m.next_attempt, 61_100);
    assert_eq!(m.last_error.as_deref(), Some("451 try later"));
    assert_eq!(m.recipients[0].state, RcptState::Delivered);
    assert_eq!(m.recipients[1].state, RcptState::Pending);
    assert_eq!(m.state(2000), MessageState::Deferred);
    assert!(!s.has_claimable(61_099));
    assert!(s.has_claimable(61_100));
    let r = apply(
        &mut s,
        61_100,
        Command::Claim {
            node: B,
            max: 10,
            lease_ms: LEASE,
        },
    );
    assert_eq!(r, Response::Leased(vec![MessageId(1)]));
    // A second delivery of the already delivered recipient changes nothing.
    report(
        &mut s,
        61_200,
        B,
        1,
        vec![delivered(0), delivered(1)],
        60_000,
    );
    assert!(s.is_empty());
}

#[test]
fn a_former_holder_reports_facts_but_does_not_reschedule() {
    let mut s = QueueState::new();
    apply(
        &mut s,
        1000,
        Command::Enqueue(new_message(1, A, &["a@x.org", "b@y.org"])),
    );
    let t = 1000 + LEASE;
    apply(
        &mut s,
        t,
        Command::Claim {
            node: B,
            max: 10,
            lease_ms: LEASE,
        },
    );
    // A was slow: its result arrives after B took over.
    report(&mut s, t + 1, A, 1, vec![delivered(0), deferred(1)], 60_000);
    let m = s.get(&MessageId(1)).unwrap();
    assert_eq!(m.recipients[0].state, RcptState::Delivered);
    assert_eq!(m.lease.unwrap().node, B, "B keeps its lease");
    assert_eq!(m.attempts, 0);
    assert_eq!(m.next_attempt, 1000);
}

#[test]
fn failed_recipients_finish_the_message() {
    let mut s = QueueState::new();
    apply(
        &mut s,
        1000,
        Command::Enqueue(new_message(1, A, &["a@x.org", "b@y.org"])),
    );
    report(
        &mut s,
        1100,
        A,
        1,
        vec![
            delivered(0),
            (
                1,
                RcptOutcome::Failed {
                    reply: "550 no such user".into(),
                },
            ),
        ],
        60_000,
    );
    assert!(s.is_empty());
}

#[test]
fn renew_and_release_only_for_the_holder() {
    let mut s = QueueState::new();
    apply(
        &mut s,
        1000,
        Command::Enqueue(new_message(1, A, &["a@x.org"])),
    );
    let r = apply(
        &mut s,
        20_000,
        Command::Renew {
            node: B,
            ids: vec![MessageId(1)],
            lease_ms: LEASE,
        },
    );
    assert_eq!(r, Response::Leased(vec![]));
    let r = apply(
        &mut s,
        20_000,
        Command::Renew {
            node: A,
            ids: vec![MessageId(1)],
            lease_ms: LEASE,
        },
    );
    assert_eq!(r, Response::Leased(vec![MessageId(1)]));
    assert_eq!(
        s.get(&MessageId(1)).unwrap().lease.unwrap().until,
        20_000 + LEASE
    );

    assert_eq!(
        apply(
            &mut s,
            20_001,
            Command::Release {
                node: B,
                ids: vec![MessageId(1)]
            }
        ),
        Response::Changed(0)
    );
    assert_eq!(
        apply(
            &mut s,
            20_001,
            Command::Release {
                node: A,
                ids: vec![MessageId(1)]
            }
        ),
        Response::Changed(1)
    );
    // Handed back: due at once for anyone.
    assert_eq!(
        s.get(&MessageId(1)).unwrap().state(20_001),
        MessageState::Ready
    );
    assert_eq!(
        apply(
            &mut s,
            20_002,
            Command::Claim {
                node: B,
                max: 1,
                lease_ms: LEASE
            }
        ),
        Response::Leased(vec![MessageId(1)])
    );
}

#[test]
fn held_mail_is_never_claimed_until_released() {
    let mut s = QueueState::new();
    apply(
        &mut s,
        1000,
        Command::Enqueue(new_message(1, A, &["a@x.org"])),
    );
    apply(
        &mut s,
        1000,
        Command::Release {
            node: A,
            ids: vec![MessageId(1)],
        },
    );
    assert_eq!(
        apply(
            &mut s,
            1001,
            Command::Admin(AdminCommand::Hold(MessageId(1)))
        ),
        Response::Changed(1)
    );
    assert_eq!(s.counts(1001).held, 1);
    assert_eq!(
        apply(
            &mut s,
            9999,
            Command::Claim {
                node: B,
                max: 1,
                lease_ms: LEASE
            }
        ),
        Response::Leased(vec![])
    );
    apply(
        &mut s,
        10_000,
        Command::Admin(AdminCommand::Unhold(MessageId(1))),
    );
    assert_eq!(
        apply(
            &mut s,
            10_000,
            Command::Claim {
                node: B,
                max: 1,
                lease_ms: LEASE
            }
        ),
        Response::Leased(vec![MessageId(1)])
    );
    assert_eq!(
        apply(&mut s, 1, Command::Admin(AdminCommand::Hold(MessageId(9)))),
        Response::NotFound
    );
}

#[test]
fn retry_now_and_delete() {
    let mut s = QueueState::new();
    for id in 1..=3 {
        apply(
            &mut s,
            1000,
            Command::Enqueue(new_message(id, A, &["a@x.org"])),
        );
        report(&mut s, 1100, A, id, vec![deferred(0)], 3_600_000);
    }
    assert_eq!(s.counts(2000).deferred, 3);
    assert_eq!(
        apply(
            &mut s,
            2000,
            Command::Admin(AdminCommand::RetryNow(Some(MessageId(2))))
        ),
        Response::Changed(1)
    );
    assert_eq!(s.counts(2000).ready, 1);
    assert_eq!(
        apply(&mut s, 2000, Command::Admin(AdminCommand::RetryNow(None))),
        Response::Changed(2)
    );
    assert_eq!(s.counts(2000).ready, 3);
    assert_eq!(
        apply(
            &mut s,
            2000,
            Command::Admin(AdminCommand::Delete(MessageId(3)))
        ),
        Response::Changed(1)
    );
    assert_eq!(
        apply(
            &mut s,
            2000,
            Command::Admin(AdminCommand::Delete(MessageId(3)))
        ),
        Response::NotFound
    );
    assert_eq!(s.len(), 2);
}

/// The same log gives the same state, and restoring from the stored messages
/// gives back an equal state (the due index included).
#[test]
fn replay_is_deterministic_and_restore_is_exact() {
    let log: Vec<Request> = vec![
        req(
            1000,
            Command::Enqueue(new_message(1, A, &["a@x.org", "b@y.org"])),
        ),
        req(1001, Command::Enqueue(new_message(2, B, &["c@x.org"]))),
        req(
            1200,
            Command::Report {
                notices: vec![],
                node: A,
                outcomes: vec![Outcome {
                    id: MessageId(1),
                    recipients: vec![delivered(0), deferred(1)],
                    retry_after_ms: 500,
                }],
            },
        ),
        req(1300, Command::Admin(AdminCommand::Hold(MessageId(2)))),
        req(
            1800,
            Command::Claim {
                node: B,
                max: 4,
                lease_ms: LEASE,
            },
        ),
    ];
    let run = || {
        let mut s = QueueState::new();
        for r in &log {
            s.apply(r, &mut Touched::default());
        }
        s
    };
    let a = run();
    assert_eq!(a, run());
    let restored = QueueState::restore(a.cluster_time(), a.messages().cloned());
    assert_eq!(restored, a);
}

fn notice(about: u128, id: u128, kind: NoticeKind) -> Notice {
    let mut m = new_message(id, A, &["from@example.net"]);
    m.sender = ReversePath::Null;
    Notice {
        about: MessageId(about),
        kind,
        message: m,
    }
}

fn report_with(
    s: &mut QueueState,
    now: Millis,
    node: NodeId,
    id: u128,
    rcpts: Vec<(u32, RcptOutcome)>,
    notices: Vec<Notice>,
) -> Response {
    apply(
        s,
        now,
        Command::Report {
            node,
            outcomes: vec![Outcome {
                id: MessageId(id),
                recipients: rcpts,
                retry_after_ms: 60_000,
            }],
            notices,
        },
    )
}

fn failed(idx: u32) -> (u32, RcptOutcome) {
    (
        idx,
        RcptOutcome::Failed {
            reply: "550 5.1.1 no such user".into(),
        },
    )
}

#[test]
fn a_failure_and_its_bounce_commit_together_and_only_once() {
    let mut s = QueueState::new();
    apply(
        &mut s,
        1000,
        Command::Enqueue(new_message(1, A, &["a@x.org", "b@y.org"])),
    );
    // The holder fails one recipient: the bounce is queued with it.
    let r = report_with(
        &mut s,
        1100,
        A,
        1,
        vec![failed(0), deferred(1)],
        vec![notice(1, 100, NoticeKind::Failure)],
    );
    assert_eq!(r, Response::Reported(vec![MessageId(100)]));
    let bounce = s.get(&MessageId(100)).unwrap();
    assert_eq!(bounce.sender, ReversePath::Null);
    assert_eq!(bounce.recipients[0].address.to_string(), "from@example.net");
    // A second report of the same failure (a retry after a lost answer, or a
    // former holder) brings its own bounce: it changes nothing, so none is queued.
    let r = report_with(
        &mut s,
        1200,
        B,
        1,
        vec![failed(0)],
        vec![notice(1, 101, NoticeKind::Failure)],
    );
    assert_eq!(r, Response::Reported(vec![]));
    assert!(s.get(&MessageId(101)).is_none());
    // Failing the last recipient finishes the message; its bounce still lands.
    let r = report_with(
        &mut s,
        1300,
        A,
        1,
        vec![failed(1)],
        vec![notice(1, 102, NoticeKind::Failure)],
    );
    assert_eq!(r, Response::Reported(vec![MessageId(102)]));
    assert!(s.get(&MessageId(1)).is_none());
    assert_eq!(s.len(), 2, "two bounces, one per failed recipient report");
}

#[test]
fn delay_notices_go_once_and_relayed_notices_only_for_new_deliveries() {
    let mut s = QueueState::new();
    apply(
        &mut s,
        1000,
        Command::Enqueue(new_message(1, A, &["a@x.org", "b@y.org"])),
    );
    let r = report_with(
        &mut s,
        1100,
        A,
        1,
        vec![deferred(0), deferred(1)],
        vec![notice(1, 100, NoticeKind::Delay)],
    );
    assert_eq!(r, Response::Reported(vec![MessageId(100)]));
    assert!(s.get(&MessageId(1)).unwrap().warned);
    let r = report_with(
        &mut s,
        70_000,
        A,
        1,
        vec![deferred(0), deferred(1)],
        vec![notice(1, 101, NoticeKind::Delay)],
    );
    assert_eq!(r, Response::Reported(vec![]));
    let r = report_with(
        &mut s,
        200_000,
        A,
        1,
        vec![delivered(0), deferred(1)],
        vec![notice(1, 102, NoticeKind::Relayed)],
    );
    assert_eq!(r, Response::Reported(vec![MessageId(102)]));
    let r = report_with(
        &mut s,
        300_000,
        A,
        1,
        vec![delivered(0)],
        vec![notice(1, 103, NoticeKind::Relayed)],
    );
    assert_eq!(
        r,
        Response::Reported(vec![]),
        "recipient 0 was already delivered"
    );
}

/// A batch applies its commands in order, exactly as one entry each would,
/// and answers each in its place.
#[test]
fn a_batch_is_its_commands_one_after_another() {
    let cmds = vec![
        Command::Enqueue(new_message(1, 1, &["a@example.org"])),
        Command::Enqueue(new_message(2, 2, &["b@example.org"])),
        Command::Enqueue(new_message(1, 1, &["a@example.org"])),
        Command::Release {
            node: 2,
            ids: vec![MessageId(2)],
        },
        Command::Claim {
            node: 3,
            max: 10,
            lease_ms: LEASE,
        },
        Command::Report {
            notices: vec![],
            node: 1,
            outcomes: vec![Outcome {
                id: MessageId(1),
                recipients: vec![delivered(0)],
                retry_after_ms: 0,
            }],
        },
    ];
    let mut one_by_one = QueueState::new();
    let answers: Vec<Response> = cmds
        .iter()
        .map(|c| apply(&mut one_by_one, 1000, c.clone()))
        .collect();
    let mut batched = QueueState::new();
    let mut touched = Touched::default();
    let got = batched.apply(&req(1000, Command::Batch(cmds)), &mut touched);
    assert_eq!(got, Response::Batch(answers.clone()));
    assert_eq!(batched, one_by_one);
    assert_eq!(answers[2], Response::Enqueued { duplicate: true });
    assert_eq!(answers[4], Response::Leased(vec![MessageId(2)]));
    assert!(touched.ids.contains(&MessageId(1)) && touched.ids.contains(&MessageId(2)));
}

/// Apply and return the events, as (id, node, name).
fn events(
    s: &mut QueueState,
    now: Millis,
    cmd: Command,
) -> Vec<(u128, Option<NodeId>, &'static str)> {
    let mut t = Touched::default();
    s.apply(&req(now, cmd), &mut t);
    t.events
        .iter()
        .map(|(id, e)| (id.0, e.node, e.kind.name()))
        .collect()
}

#[test]
fn the_history_of_a_message_follows_what_the_log_did_to_it() {
    let mut s = QueueState::new();
    let mut m = new_message(1, A, &["a@example.org", "b@example.org"]);
    m.body =
        Bytes::from_static(b"Received: from client.test ([192.0.2.1])\r\n\tby x\r\n\r\nhi\r\n");
    let mut t = Touched::default();
    s.apply(&req(1_000, Command::Enqueue(m.clone())), &mut t);
    assert_eq!(
        t.events[0].1.kind,
        EventKind::Accepted {
            from: "from@example.net".into(),
            client: Some("client.test [192.0.2.1]".into()),
            recipients: 2,
        }
    );
    // A retried proposal adds nothing.
    assert!(events(&mut s, 1_100, Command::Enqueue(m)).is_empty());

    // A's lease lapses; B's claim takes it over.
    let claim = Command::Claim {
        node: B,
        max: 10,
        lease_ms: LEASE,
    };
    assert_eq!(
        events(&mut s, 1_000 + LEASE + 1, claim),
        [(1, Some(B), "taken_over")]
    );

    // B's attempt: one delivered, one deferred; then the deferred one fails,
    // with a bounce.
    let at = 1_000 + LEASE + 2;
    assert_eq!(
        events(
            &mut s,
            at,
            Command::Report {
                node: B,
                outcomes: vec![Outcome {
                    id: MessageId(1),
                    recipients: vec![delivered(0), deferred(1)],
                    retry_after_ms: 1,
                }],
                notices: vec![],
            }
        ),
        [
            (1, Some(B), "attempt"),
            (1, Some(B), "delivered"),
            (1, Some(B), "deferred")
        ]
    );
    let evs = events(
        &mut s,
        at + 10,
        Command::Report {
            node: B,
            outcomes: vec![Outcome {
                id: MessageId(1),
                recipients: vec![failed(1)],
                retry_after_ms: 1,
            }],
            notices: vec![notice(1, 9, NoticeKind::Failure)],
        },
    );
    assert_eq!(
        evs,
        [
            (1, Some(B), "attempt"),
            (1, Some(B), "failed"),
            (9, Some(A), "accepted"),
            (1, Some(B), "bounced")
        ]
    );

    // Operators' actions have no node; an action on nothing is no event.
    assert_eq!(
        events(
            &mut s,
            at + 20,
            Command::Admin(AdminCommand::Hold(MessageId(9)))
        ),
        [(9, None, "held")]
    );
    assert_eq!(
        events(
            &mut s,
            at + 21,
            Command::Admin(AdminCommand::Unhold(MessageId(9)))
        ),
        [(9, None, "released")]
    );
    assert_eq!(
        events(
            &mut s,
            at + 22,
            Command::Admin(AdminCommand::Delete(MessageId(9)))
        ),
        [(9, None, "deleted")]
    );
    assert!(events(
        &mut s,
        at + 23,
        Command::Admin(AdminCommand::Hold(MessageId(9)))
    )
    .is_empty());
}

#[test]
fn a_recipient_failed_for_its_age_is_expired() {
    let mut s = QueueState::new();
    apply(
        &mut s,
        1,
        Command::Enqueue(new_message(1, A, &["a@example.org"])),
    );
    let reply = format!("{EXPIRED_PREFIX} 5days in the queue");
    let evs = events(
        &mut s,
        2,
        Command::Report {
            node: A,
            outcomes: vec![Outcome {
                id: MessageId(1),
                recipients: vec![(0, RcptOutcome::Failed { reply })],
                retry_after_ms: 1,
            }],
            notices: vec![],
        },
    );
    assert_eq!(evs, [(1, Some(A), "attempt"), (1, Some(A), "expired")]);
}

fn sts_policy(domain: &str, expires: u64) -> StsPolicy {
    StsPolicy {
        domain: domain.into(),
        id: "1".into(),
        mode: StsMode::Testing,
        mx: vec!["*.example.org".into()],
        max_age: 60,
        expires,
    }
}

#[test]
fn mta_sts_policies_are_bounded_checked_and_the_newest_kept() {
    let mut s = QueueState::new();
    apply(
        &mut s,
        1,
        Command::SetStsPolicy(sts_policy("example.org", 10)),
    );
    apply(
        &mut s,
        2,
        Command::SetStsPolicy(sts_policy("example.org", 5)),
    );
    assert_eq!(s.sts_policy("example.org").unwrap().expires, 10);
    // Out of bounds: ignored, not stored.
    let mut bad = sts_policy("example.net", 20);
    bad.id = "x".repeat(33);
    apply(&mut s, 3, Command::SetStsPolicy(bad));
    assert!(s.sts_policy("example.net").is_none());
    // Full: the one expiring first makes room.
    for i in 0..MAX_STS_POLICIES {
        apply(
            &mut s,
            4,
            Command::SetStsPolicy(sts_policy(&format!("d{i}.test"), 100 + i as u64)),
        );
    }
    assert_eq!(s.sts_policies().count(), MAX_STS_POLICIES);
    assert!(
        s.sts_policy("example.org").is_none(),
        "expired soonest, gone first"
    );
    assert!(s.sts_policy("d0.test").is_some());
}

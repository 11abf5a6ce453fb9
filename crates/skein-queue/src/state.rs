//! The queue state machine: a pure function of the log.
//!
//! `QueueState::apply` takes one request and changes the in-memory queue. It
//! reads no clock, no random source and no environment: time comes from the
//! request, so every node that applies the same log holds the same queue.
//! Storage (`crate::store`) persists what `apply` reports as touched.

use std::collections::{BTreeMap, BTreeSet};

use crate::history::{client_of, Event, EventKind, EXPIRED_PREFIX};
use crate::types::*;
use crate::MessageId;

#[derive(Debug, Default, Clone, PartialEq)]
pub struct QueueState {
    cluster_time: Millis,
    messages: BTreeMap<MessageId, Message>,
    /// Every message that is not held, by the time it can next be claimed.
    due: BTreeSet<(Millis, MessageId)>,
    /// Recipient domains' MTA-STS policies, by domain.
    sts: BTreeMap<String, StsPolicy>,
}

/// What an apply touched, for storage to write back, and the events it
/// made. An id may be both created and removed within one batch; storage
/// looks at the final state.
#[derive(Debug, Default)]
pub struct Touched {
    pub ids: Vec<MessageId>,
    pub events: Vec<(MessageId, Event)>,
    /// Domains whose MTA-STS policy was set or dropped.
    pub sts: Vec<String>,
}

impl Touched {
    fn event(&mut self, id: MessageId, at: Millis, node: Option<NodeId>, kind: EventKind) {
        self.events.push((id, Event { at, node, kind }));
    }
}

/// Counts by state, for `skeinctl status` and the queue gauges.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub messages: u64,
    pub ready: u64,
    pub leased: u64,
    pub deferred: u64,
    pub held: u64,
}

impl QueueState {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn cluster_time(&self) -> Millis {
        self.cluster_time
    }

    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    pub fn get(&self, id: &MessageId) -> Option<&Message> {
        self.messages.get(id)
    }

    pub fn messages(&self) -> impl Iterator<Item = &Message> {
        self.messages.values()
    }

    /// Rebuild from storage: the stored cluster time and messages.
    pub fn restore(cluster_time: Millis, messages: impl IntoIterator<Item = Message>) -> Self {
        let mut s = QueueState {
            cluster_time,
            ..Default::default()
        };
        for m in messages {
            s.insert(m);
        }
        s
    }

    /// Add the MTA-STS policies storage kept (at open, after [`Self::restore`]).
    pub fn restore_sts(&mut self, policies: impl IntoIterator<Item = StsPolicy>) {
        for p in policies {
            self.sts.insert(p.domain.clone(), p);
        }
    }

    /// The MTA-STS policy kept for `domain`, expired or not.
    pub fn sts_policy(&self, domain: &str) -> Option<&StsPolicy> {
        self.sts.get(domain)
    }

    pub fn sts_policies(&self) -> impl Iterator<Item = &StsPolicy> {
        self.sts.values()
    }

    /// Advance cluster time for entries that carry none of their own (blank
    /// and membership entries carry no time and leave it as it is).
    pub fn observe_time(&mut self, now: Millis) {
        self.cluster_time = self.cluster_time.max(now);
    }

    /// When the earliest claimable message becomes due, if any.
    pub fn next_due(&self) -> Option<Millis> {
        self.due.first().map(|(t, _)| *t)
    }

    /// Whether `node` could claim something at `now` (a local, read-only check
    /// made before proposing a Claim, so idle nodes write nothing to the log).
    pub fn has_claimable(&self, now: Millis) -> bool {
        self.next_due().is_some_and(|t| t <= now)
    }

    pub fn counts(&self, now: Millis) -> Counts {
        let mut c = Counts {
            messages: self.messages.len() as u64,
            ..Default::default()
        };
        for m in self.messages.values() {
            match m.state(now) {
                MessageState::Ready => c.ready += 1,
                MessageState::Leased => c.leased += 1,
                MessageState::Deferred => c.deferred += 1,
                MessageState::Held => c.held += 1,
            }
        }
        c
    }

    pub fn apply(&mut self, req: &Request, touched: &mut Touched) -> Response {
        self.observe_time(req.now);
        let now = self.cluster_time;
        self.apply_command(now, &req.cmd, touched)
    }

    fn apply_command(&mut self, now: Millis, cmd: &Command, touched: &mut Touched) -> Response {
        match cmd {
            Command::Batch(cmds) => Response::Batch(
                cmds.iter()
                    .map(|c| self.apply_command(now, c, touched))
                    .collect(),
            ),
            Command::Enqueue(m) => self.enqueue(now, m, touched),
            Command::Claim {
                node,
                max,
                lease_ms,
            } => self.claim(now, *node, *max, *lease_ms, touched),
            Command::Renew {
                node,
                ids,
                lease_ms,
            } => self.renew(now, *node, ids, *lease_ms, touched),
            Command::Release { node, ids } => self.release(*node, ids, touched),
            Command::Report {
                node,
                outcomes,
                notices,
            } => self.report(now, *node, outcomes, notices, touched),
            Command::Admin(a) => self.admin(now, a, touched),
            Command::SetStsPolicy(p) => self.set_sts(p, touched),
        }
    }

    fn set_sts(&mut self, p: &StsPolicy, touched: &mut Touched) -> Response {
        if !p.is_valid() {
            return Response::Done;
        }
        // Two nodes may fetch at once: the policy that lasts longer wins,
        // and one arriving late never undoes a newer one.
        if self
            .sts
            .get(&p.domain)
            .is_some_and(|old| old.expires > p.expires)
        {
            return Response::Done;
        }
        if !self.sts.contains_key(&p.domain) && self.sts.len() >= MAX_STS_POLICIES {
            let first = self
                .sts
                .values()
                .min_by(|a, b| (a.expires, &a.domain).cmp(&(b.expires, &b.domain)))
                .map(|p| p.domain.clone());
            if let Some(d) = first {
                self.sts.remove(&d);
                touched.sts.push(d);
            }
        }
        self.sts.insert(p.domain.clone(), p.clone());
        touched.sts.push(p.domain.clone());
        Response::Done
    }

    fn enqueue(&mut self, now: Millis, m: &NewMessage, touched: &mut Touched) -> Response {
        // A retried proposal (the answer to the first was lost) carries the same
        // id. The accepting node delivers only after its 250, and a retry comes
        // within the commit timeout, well inside the lease, so the first copy is
        // still queued when the retry arrives.
        if self.messages.contains_key(&m.id) {
            return Response::Enqueued { duplicate: true };
        }
        if m.recipients.is_empty() {
            return Response::Done;
        }
        let msg = Message {
            id: m.id,
            sender: m.sender.clone(),
            recipients: m
                .recipients
                .iter()
                .map(|r| Recipient {
                    address: r.address.clone(),
                    params: r.params.clone(),
                    state: RcptState::Pending,
                    last_reply: None,
                })
                .collect(),
            params: m.params.clone(),
            size: m.body.len() as u64,
            received_at: now,
            accepted_by: m.owner,
            attempts: 0,
            next_attempt: now,
            last_error: None,
            // No lease asked (a learner that does not deliver): due at once,
            // for the voters to claim.
            lease: (m.lease_ms > 0).then(|| Lease {
                node: m.owner,
                until: now.saturating_add(m.lease_ms),
            }),
            held: false,
            warned: false,
        };
        self.insert(msg);
        touched.ids.push(m.id);
        touched.event(
            m.id,
            now,
            Some(m.owner),
            EventKind::Accepted {
                from: m.sender.to_string(),
                client: client_of(&m.body),
                recipients: m.recipients.len() as u32,
            },
        );
        Response::Enqueued { duplicate: false }
    }

    fn claim(
        &mut self,
        now: Millis,
        node: NodeId,
        max: u32,
        lease_ms: u64,
        touched: &mut Touched,
    ) -> Response {
        let picked: Vec<MessageId> = self
            .due
            .range(..=(now, MessageId(u128::MAX)))
            .take(max as usize)
            .map(|(_, id)| *id)
            .collect();
        for id in &picked {
            if let Some(from) = self.lease_holder(id).filter(|h| *h != node) {
                touched.event(*id, now, Some(node), EventKind::TakenOver { from });
            }
            self.update(id, touched, |m| {
                m.lease = Some(Lease {
                    node,
                    until: now.saturating_add(lease_ms),
                })
            });
        }
        Response::Leased(picked)
    }

    fn renew(
        &mut self,
        now: Millis,
        node: NodeId,
        ids: &[MessageId],
        lease_ms: u64,
        touched: &mut Touched,
    ) -> Response {
        let mut held = Vec::new();
        for id in ids {
            if self.lease_holder(id) == Some(node) {
                self.update(id, touched, |m| {
                    if let Some(l) = &mut m.lease {
                        l.until = l.until.max(now.saturating_add(lease_ms));
                    }
                });
                held.push(*id);
            }
        }
        Response::Leased(held)
    }

    fn release(&mut self, node: NodeId, ids: &[MessageId], touched: &mut Touched) -> Response {
        let mut n = 0;
        for id in ids {
            if self.lease_holder(id) == Some(node) {
                self.update(id, touched, |m| m.lease = None);
                n += 1;
            }
        }
        Response::Changed(n)
    }

    fn report(
        &mut self,
        now: Millis,
        node: NodeId,
        outcomes: &[Outcome],
        notices: &[Notice],
        touched: &mut Touched,
    ) -> Response {
        // Which messages this report really moved: only those get notices.
        let mut newly_failed = BTreeSet::new();
        let mut newly_delivered = BTreeSet::new();
        for o in outcomes {
            let Some(m) = self.messages.get(&o.id) else {
                continue;
            };
            // Delivered and failed are facts whoever reports them; scheduling the
            // next attempt belongs to the lease holder alone, since after a
            // takeover another node is already working on the message.
            let is_holder = m.lease.is_some_and(|l| l.node == node);
            let mut events = Vec::new();
            self.update(&o.id, touched, |m| {
                let mut deferred_reply = None;
                for (idx, outcome) in &o.recipients {
                    let Some(r) = m.recipients.get_mut(*idx as usize) else {
                        continue;
                    };
                    if r.state != RcptState::Pending {
                        continue;
                    }
                    let recipient = r.address.to_string();
                    match outcome {
                        RcptOutcome::Delivered { reply } => {
                            r.state = RcptState::Delivered;
                            r.last_reply = Some(reply.clone());
                            newly_delivered.insert(o.id);
                            events.push(EventKind::Delivered {
                                recipient,
                                reply: reply.clone(),
                            });
                        }
                        RcptOutcome::Failed { reply } => {
                            r.state = RcptState::Failed;
                            r.last_reply = Some(reply.clone());
                            newly_failed.insert(o.id);
                            events.push(if reply.starts_with(EXPIRED_PREFIX) {
                                EventKind::Expired {
                                    recipient,
                                    reply: reply.clone(),
                                }
                            } else {
                                EventKind::Failed {
                                    recipient,
                                    reply: reply.clone(),
                                }
                            });
                        }
                        RcptOutcome::Deferred { reply } => {
                            r.last_reply = Some(reply.clone());
                            deferred_reply.get_or_insert_with(|| reply.clone());
                            events.push(EventKind::Deferred {
                                recipient,
                                reply: reply.clone(),
                            });
                        }
                    }
                }
                if is_holder {
                    m.lease = None;
                    m.attempts = m.attempts.saturating_add(1);
                    m.next_attempt = now.saturating_add(o.retry_after_ms);
                    if deferred_reply.is_some() {
                        m.last_error = deferred_reply;
                    }
                }
            });
            if !events.is_empty() {
                let recipients = events.len() as u32;
                touched.event(o.id, now, Some(node), EventKind::Attempt { recipients });
                for kind in events {
                    touched.event(o.id, now, Some(node), kind);
                }
            }
        }
        let mut enqueued = Vec::new();
        for n in notices {
            let wanted = match n.kind {
                NoticeKind::Failure => newly_failed.contains(&n.about),
                NoticeKind::Relayed => newly_delivered.contains(&n.about),
                NoticeKind::Delay => {
                    let first = self
                        .messages
                        .get(&n.about)
                        .is_some_and(|m| !m.warned && !m.is_finished());
                    if first {
                        self.update(&n.about, touched, |m| m.warned = true);
                    }
                    first
                }
            };
            if wanted
                && self.enqueue(now, &n.message, touched)
                    == (Response::Enqueued { duplicate: false })
            {
                enqueued.push(n.message.id);
                let kind = n.kind.as_str();
                touched.event(
                    n.about,
                    now,
                    Some(node),
                    EventKind::Bounced {
                        notice: n.message.id,
                        kind: kind.into(),
                    },
                );
            }
        }
        // Finished messages leave the queue once their notices are out.
        for o in outcomes {
            if self.messages.get(&o.id).is_some_and(Message::is_finished) {
                self.remove(&o.id, touched);
            }
        }
        Response::Reported(enqueued)
    }

    fn admin(&mut self, now: Millis, a: &AdminCommand, touched: &mut Touched) -> Response {
        match a {
            AdminCommand::Hold(id) => {
                let r = self.admin_one(id, touched, |m| m.held = true);
                if r == Response::Changed(1) {
                    touched.event(*id, now, None, EventKind::Held);
                }
                r
            }
            AdminCommand::Unhold(id) => {
                let r = self.admin_one(id, touched, |m| m.held = false);
                if r == Response::Changed(1) {
                    touched.event(*id, now, None, EventKind::Released);
                }
                r
            }
            AdminCommand::Delete(id) => {
                if self.remove(id, touched) {
                    touched.event(*id, now, None, EventKind::Deleted);
                    Response::Changed(1)
                } else {
                    Response::NotFound
                }
            }
            AdminCommand::RetryNow(Some(id)) => {
                self.admin_one(id, touched, |m| m.next_attempt = m.next_attempt.min(now))
            }
            AdminCommand::Import { message, .. } => {
                if self.messages.contains_key(&message.id) {
                    return Response::Changed(0);
                }
                let mut m = (**message).clone();
                m.lease = None;
                let id = m.id;
                self.insert(m);
                touched.ids.push(id);
                touched.event(id, now, None, EventKind::Restored);
                Response::Changed(1)
            }
            AdminCommand::RetryNow(None) => {
                let ids: Vec<MessageId> = self
                    .messages
                    .values()
                    .filter(|m| !m.held && m.next_attempt > now)
                    .map(|m| m.id)
                    .collect();
                for id in &ids {
                    self.update(id, touched, |m| m.next_attempt = now);
                }
                Response::Changed(ids.len() as u64)
            }
        }
    }

    fn admin_one(
        &mut self,
        id: &MessageId,
        touched: &mut Touched,
        f: impl FnOnce(&mut Message),
    ) -> Response {
        if self.update(id, touched, f) {
            Response::Changed(1)
        } else {
            Response::NotFound
        }
    }

    fn lease_holder(&self, id: &MessageId) -> Option<NodeId> {
        self.messages.get(id).and_then(|m| m.lease).map(|l| l.node)
    }

    /// Change one message, keeping the due index right.
    fn update(
        &mut self,
        id: &MessageId,
        touched: &mut Touched,
        f: impl FnOnce(&mut Message),
    ) -> bool {
        let Some(m) = self.messages.get_mut(id) else {
            return false;
        };
        if !m.held {
            self.due.remove(&(m.due_at(), *id));
        }
        f(m);
        if !m.held {
            self.due.insert((m.due_at(), *id));
        }
        touched.ids.push(*id);
        true
    }

    fn insert(&mut self, m: Message) {
        if !m.held {
            self.due.insert((m.due_at(), m.id));
        }
        self.messages.insert(m.id, m);
    }

    fn remove(&mut self, id: &MessageId, touched: &mut Touched) -> bool {
        let Some(m) = self.messages.remove(id) else {
            return false;
        };
        self.due.remove(&(m.due_at(), *id));
        touched.ids.push(*id);
        true
    }
}

#[cfg(test)]
mod tests;

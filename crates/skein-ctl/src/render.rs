//! What `skeinctl` prints: a readable table, or JSON with `--json` (the
//! field names of the contract; the JSON is one document per command).

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use serde_json::{json, Value};
use skein_proto::v1::{
    DrainReply, MembershipReply, NodeStatus, QueuedMessage, RecoverReply, RestoreReply,
    StatusReply, TraceReply,
};

fn to_json(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    s.push('\n');
    s
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// A time in milliseconds since the epoch, or JSON null for "none" (0).
fn time_or_null(ms: u64) -> Value {
    if ms == 0 {
        Value::Null
    } else {
        Value::String(rfc3339(ms))
    }
}

fn id_or_null(id: u64) -> Value {
    if id == 0 {
        Value::Null
    } else {
        json!(id)
    }
}

/// Columns padded to their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (c, w) in cells.zip(&widths) {
            let _ = write!(l, "{c:<w$}  ");
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for r in rows {
        line(&mut r.iter().map(String::as_str));
    }
    out
}

fn node_json(n: &NodeStatus) -> Value {
    json!({
        "id": n.id,
        "addr": n.addr,
        "role": n.role,
        "voter": n.voter,
        "reachable": n.reachable,
        "last_log_index": n.last_log_index,
        "applied": n.applied_index,
        "lag": n.lag,
        "draining": n.draining,
        "version": if n.version.is_empty() { Value::Null } else { json!(n.version) },
        "smtp": n.smtp_addrs,
        "site": if n.site.is_empty() { Value::Null } else { json!(n.site) },
    })
}

/// The versions the reachable nodes run, when they are not all the same
/// (a rolling upgrade under way).
fn mixed_versions(s: &StatusReply) -> Option<Vec<String>> {
    let mut v: Vec<String> = s
        .nodes
        .iter()
        .filter(|n| !n.version.is_empty())
        .map(|n| n.version.clone())
        .collect();
    v.sort();
    v.dedup();
    (v.len() > 1).then_some(v)
}

pub fn status(s: &StatusReply, json: bool) -> String {
    let q = s.queue.unwrap_or_default();
    if json {
        return to_json(&json!({
            "answered_by": s.node_id,
            "leader": s.leader,
            "term": s.term,
            "nodes": s.nodes.iter().map(node_json).collect::<Vec<_>>(),
            "mixed_versions": mixed_versions(s).is_some(),
            "queue": {
                "messages": q.messages,
                "ready": q.ready,
                "leased": q.leased,
                "deferred": q.deferred,
                "held": q.held,
            },
        }));
    }
    let mut out = String::new();
    let leader = if s.leader == 0 {
        "NONE (no quorum?)".to_string()
    } else {
        s.leader.to_string()
    };
    let _ = writeln!(
        out,
        "leader {leader}, term {} (answered by node {})",
        s.term, s.node_id
    );
    out.push('\n');
    // Sites only when the cluster names them.
    let sites = s.nodes.iter().any(|n| !n.site.is_empty());
    let rows: Vec<Vec<String>> = s
        .nodes
        .iter()
        .map(|n| {
            let mut health = Vec::new();
            if !n.reachable {
                health.push("unreachable".to_string());
            }
            if let Some(l) = n.lag.filter(|&l| l > 0) {
                health.push(format!("lagging {l}"));
            }
            if n.draining {
                health.push("draining".to_string());
            }
            let health = if health.is_empty() {
                "ok".to_string()
            } else {
                health.join(", ")
            };
            let mut row = vec![
                n.id.to_string(),
                n.addr.clone(),
                n.role.clone(),
                if n.voter { "yes" } else { "no" }.into(),
                health,
                n.last_log_index.to_string(),
                n.applied_index.to_string(),
                n.lag.map_or("?".into(), |l| l.to_string()),
                if n.version.is_empty() {
                    "?".into()
                } else {
                    n.version.clone()
                },
            ];
            if sites {
                row.insert(
                    2,
                    if n.site.is_empty() {
                        "-".into()
                    } else {
                        n.site.clone()
                    },
                );
            }
            row
        })
        .collect();
    let mut header = vec![
        "ID", "ADDRESS", "ROLE", "VOTER", "HEALTH", "LAST LOG", "APPLIED", "LAG", "VERSION",
    ];
    if sites {
        header.insert(2, "SITE");
    }
    out.push_str(&table(&header, &rows));
    if let Some(v) = mixed_versions(s) {
        let _ = writeln!(
            out,
            "\nmixed versions: {} (a rolling upgrade under way?)",
            v.join(", ")
        );
    }
    out.push('\n');
    let _ = writeln!(
        out,
        "queue: {} messages — {} ready, {} leased, {} deferred, {} held",
        q.messages, q.ready, q.leased, q.deferred, q.held
    );
    out
}

fn message_json(m: &QueuedMessage) -> Value {
    json!({
        "id": m.id,
        "sender": m.sender,
        "recipients": m.recipients.iter().map(|r| json!({
            "address": r.address,
            "state": r.state,
            "last_reply": if r.last_reply.is_empty() { Value::Null } else { json!(r.last_reply) },
        })).collect::<Vec<_>>(),
        "state": m.state,
        "size": m.size,
        "attempts": m.attempts,
        "next_attempt": time_or_null(m.next_attempt_ms),
        "owner": id_or_null(m.owner),
        "lease_until": time_or_null(m.lease_until_ms),
        "last_error": if m.last_error.is_empty() { Value::Null } else { json!(m.last_error) },
        "received_at": time_or_null(m.received_at_ms),
        "accepted_by": id_or_null(m.accepted_by),
    })
}

fn sender(m: &QueuedMessage) -> String {
    if m.sender.is_empty() {
        "<>".into()
    } else {
        m.sender.clone()
    }
}

pub fn queue_list(ms: &[QueuedMessage], json: bool) -> String {
    if json {
        return to_json(&Value::Array(ms.iter().map(message_json).collect()));
    }
    if ms.is_empty() {
        return "the queue is empty\n".into();
    }
    let rows: Vec<Vec<String>> = ms
        .iter()
        .map(|m| {
            let pending = m.recipients.iter().filter(|r| r.state == "pending").count();
            vec![
                m.id.clone(),
                m.state.clone(),
                m.size.to_string(),
                m.attempts.to_string(),
                if m.next_attempt_ms == 0 {
                    "now".into()
                } else {
                    rfc3339(m.next_attempt_ms)
                },
                sender(m),
                format!("{pending}/{}", m.recipients.len()),
                first_line(&m.last_error),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "ID",
            "STATE",
            "SIZE",
            "TRIES",
            "NEXT",
            "SENDER",
            "PENDING",
            "LAST ERROR",
        ],
        &rows,
    );
    let _ = writeln!(out, "{} message(s)", ms.len());
    out
}

fn first_line(s: &str) -> String {
    let l = s.lines().next().unwrap_or("");
    if l.chars().count() > 60 {
        format!("{}…", l.chars().take(59).collect::<String>())
    } else {
        l.to_string()
    }
}

pub fn message(m: &QueuedMessage, json: bool) -> String {
    if json {
        return to_json(&message_json(m));
    }
    let mut out = String::new();
    let or_none = |ms: u64, none: &str| {
        if ms == 0 {
            none.to_string()
        } else {
            rfc3339(ms)
        }
    };
    let node = |id: u64| {
        if id == 0 {
            "none".to_string()
        } else {
            format!("node {id}")
        }
    };
    let _ = writeln!(out, "id:            {}", m.id);
    let _ = writeln!(out, "state:         {}", m.state);
    let _ = writeln!(out, "sender:        {}", sender(m));
    let _ = writeln!(out, "size:          {} bytes", m.size);
    let _ = writeln!(
        out,
        "received:      {} by {}",
        or_none(m.received_at_ms, "?"),
        node(m.accepted_by)
    );
    let _ = writeln!(out, "attempts:      {}", m.attempts);
    let _ = writeln!(out, "next attempt:  {}", or_none(m.next_attempt_ms, "now"));
    let _ = writeln!(out, "owner:         {}", node(m.owner));
    if m.owner != 0 {
        let _ = writeln!(out, "lease until:   {}", or_none(m.lease_until_ms, "?"));
    }
    let _ = writeln!(
        out,
        "last error:    {}",
        if m.last_error.is_empty() {
            "none"
        } else {
            &m.last_error
        }
    );
    out.push_str("recipients:\n");
    let rows: Vec<Vec<String>> = m
        .recipients
        .iter()
        .map(|r| vec![r.address.clone(), r.state.clone(), r.last_reply.clone()])
        .collect();
    for l in table(&["ADDRESS", "STATE", "LAST REPLY"], &rows).lines() {
        let _ = writeln!(out, "  {l}");
    }
    out
}

pub fn changed(what: &str, n: u64, json: bool) -> String {
    if json {
        return to_json(&json!({ "changed": n }));
    }
    format!("{n} message(s) {what}\n")
}

pub fn membership(m: &MembershipReply, json: bool) -> String {
    if json {
        return to_json(&json!({
            "voters": m.voters,
            "learners": m.learners,
            "log_index": m.log_index,
        }));
    }
    let list = |ids: &[u64]| {
        if ids.is_empty() {
            "none".to_string()
        } else {
            ids.iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    format!(
        "voters now: {}; learners: {} (membership entry at log index {})\n",
        list(&m.voters),
        list(&m.learners),
        m.log_index
    )
}

pub fn recover(r: &RecoverReply, json: bool) -> String {
    if json {
        return to_json(&json!({
            "node": r.node_id,
            "last_log_index": r.last_log_index,
            "committed_known": r.committed_known,
            "committed_known_by": r.committed_known_by,
            "reachable": r.reachable,
            "unreachable": r.unreachable,
            "recovering": r.recovering,
            "summary": r.summary,
        }));
    }
    let what = if r.recovering {
        format!(
            "node {} restarts as the single voter of a new configuration; add nodes with \
             `skeinctl cluster add-node` (wipe the old members' data first)",
            r.node_id
        )
    } else {
        "nothing changed: run again with --force to recover here".to_string()
    };
    format!("{}\n{what}\n", r.summary)
}

pub fn drain(d: &DrainReply, json: bool) -> String {
    if json {
        return to_json(&json!({
            "node": d.node_id,
            "leader": d.leader,
            "leases_released": d.leases_released,
        }));
    }
    format!(
        "node {} drained: refusing new SMTP sessions, {} lease(s) handed back, leader is node {}; \
         it can be stopped now\n",
        d.node_id, d.leases_released, d.leader
    )
}

pub fn backup(file: &std::path::Path, bytes: u64, json: bool) -> String {
    if json {
        return to_json(&json!({ "file": file.display().to_string(), "bytes": bytes }));
    }
    format!("backup written to {} ({bytes} bytes)\n", file.display())
}

pub fn restore(r: &RestoreReply, json: bool) -> String {
    if json {
        return to_json(&json!({ "queued": r.queued, "present": r.present }));
    }
    format!(
        "{} message(s) queued, {} already present\n",
        r.queued, r.present
    )
}

pub fn trace(t: &TraceReply, json: bool) -> String {
    if json {
        let events: Vec<Value> = t
            .events
            .iter()
            .map(|e| {
                let mut v = json!({
                    "at": rfc3339_millis(e.at_ms),
                    "node": e.node,
                    "event": e.event,
                });
                let o = v.as_object_mut().expect("an object");
                let mut put = |k: &str, x: Value| {
                    if !x.is_null() {
                        o.insert(k.into(), x);
                    }
                };
                put("recipient", json!(e.recipient));
                put("reply", json!(e.reply));
                put("from", json!(e.from));
                put("client", json!(e.client));
                put("recipients", json!(e.recipients));
                put("taken_from", json!(e.taken_from));
                put("notice", json!(e.notice));
                put("notice_kind", json!(e.notice_kind));
                v
            })
            .collect();
        return to_json(&json!({ "id": t.id, "events": events }));
    }
    let rows: Vec<Vec<String>> = t
        .events
        .iter()
        .map(|e| {
            let mut what = Vec::new();
            if let Some(f) = &e.from {
                what.push(format!("from <{f}>"));
            }
            if let Some(c) = &e.client {
                what.push(format!("client {c}"));
            }
            if let Some(n) = e.taken_from {
                what.push(format!("from node {n}, whose lease lapsed"));
            }
            if let Some(r) = &e.recipient {
                what.push(format!("<{r}>"));
            }
            if let Some(r) = &e.reply {
                what.push(first_line(r));
            }
            if let (Some(n), Some(k)) = (&e.notice, &e.notice_kind) {
                what.push(format!("{k} notice {n}"));
            }
            if e.event == "attempt" || (e.event == "accepted" && e.recipients.is_some()) {
                if let Some(n) = e.recipients {
                    what.push(format!("{n} recipient(s)"));
                }
            }
            vec![
                rfc3339_millis(e.at_ms),
                e.node.map_or("operator".into(), |n| n.to_string()),
                e.event.clone(),
                what.join(", "),
            ]
        })
        .collect();
    let mut out = format!("{}\n", t.id);
    out.push_str(&table(&["AT", "NODE", "EVENT", "WHAT"], &rows));
    out
}

fn rfc3339_millis(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64, version: &str) -> NodeStatus {
        NodeStatus {
            id,
            addr: format!("10.0.0.{id}:7100"),
            role: "follower".into(),
            voter: true,
            reachable: !version.is_empty(),
            version: version.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_rolling_upgrade_shows_as_mixed_versions() {
        let mut s = StatusReply {
            leader: 1,
            nodes: vec![node(1, "0.2.0"), node(2, "0.1.0"), node(3, "")],
            ..Default::default()
        };
        let text = status(&s, false);
        assert!(text.contains("mixed versions: 0.1.0, 0.2.0"), "{text}");
        let v: Value = serde_json::from_str(&status(&s, true)).unwrap();
        assert_eq!(v["mixed_versions"], true);
        assert_eq!(v["nodes"][0]["version"], "0.2.0");
        assert!(
            v["nodes"][2]["version"].is_null(),
            "unknown when unreachable"
        );
        s.nodes[1].version = "0.2.0".into();
        assert!(!status(&s, false).contains("mixed"));
    }
}

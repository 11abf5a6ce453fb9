//! `skeinctl cluster recover [--force]`: a way back when a majority of the
//! voters is gone for good (a site lost). The node asked becomes the single
//! voter of a new configuration holding everything it has (see
//! `skein_queue::store::recovery`), and accepts and delivers again at once.
//!
//! What it checks first, from what it can reach:
//! - no member can commit: a working majority means there is nothing to
//!   recover, and recovering beside it would split the cluster in two;
//! - no reachable member holds more of the log: recover there instead.
//!
//! What it cannot check is a member it cannot reach: a majority on the far
//! side of a partition may still be working. That is the operator's call,
//! which `--force` makes; the report says which members did not answer.

use skein_proto::v1::{NodeInfoReply, RecoverReply};
use skein_queue::NodeId;
use tokio::sync::mpsc::UnboundedSender;
use tonic::Status;

use crate::cluster::Cluster;
use crate::node::Restart;

pub async fn recover(
    cluster: &Cluster,
    restart: &UnboundedSender<Restart>,
    data_dir: &std::path::Path,
    force: bool,
) -> Result<RecoverReply, Status> {
    let me = cluster.id();
    let mut reachable: Vec<(NodeId, NodeInfoReply)> = Vec::new();
    let mut unreachable = Vec::new();
    let mut my_addr = None;
    for (id, addr, _voter, info) in cluster.gather_node_info().await {
        if id == me {
            my_addr = Some(addr.clone());
        }
        match info {
            Some(i) => reachable.push((id, i)),
            None => unreachable.push(id),
        }
    }
    if let Some((id, i)) = reachable.iter().find(|(_, i)| i.can_commit) {
        return Err(Status::failed_precondition(format!(
            "node {id} can commit (leader {}): the cluster has a working majority, \
             nothing to recover",
            i.leader
        )));
    }
    let mine = reachable
        .iter()
        .find(|(id, _)| *id == me)
        .map(|(_, i)| i.last_log_index)
        .unwrap_or(0);
    if let Some((id, i)) = reachable
        .iter()
        .filter(|(id, _)| *id != me)
        .max_by_key(|(_, i)| i.last_log_index)
        .filter(|(_, i)| i.last_log_index > mine)
    {
        return Err(Status::failed_precondition(format!(
            "node {id} holds more of the log (index {} against {mine} here): recover there",
            i.last_log_index
        )));
    }
    let (known_by, committed_known) = reachable
        .iter()
        .map(|(id, i)| (*id, i.applied_index))
        .max_by_key(|(_, applied)| *applied)
        .unwrap_or((me, 0));
    let mut summary = format!(
        "node {me} holds the log up to index {mine}; the highest entry a reachable member \
         applied, so knows was committed, is {committed_known} (node {known_by}). "
    );
    if unreachable.is_empty() {
        summary.push_str("Every member answered and none can commit.");
    } else {
        summary.push_str(&format!(
            "Members {} did not answer: mail they committed after index {mine} is lost, and \
             if they still form a majority somewhere, recovering here splits the cluster in two.",
            unreachable
                .iter()
                .map(|id| id.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let mut reply = RecoverReply {
        node_id: me,
        last_log_index: mine,
        committed_known,
        committed_known_by: known_by,
        reachable: reachable.iter().map(|(id, _)| *id).collect(),
        unreachable,
        recovering: false,
        summary,
    };
    if !force {
        return Ok(reply);
    }
    if restart.is_closed() {
        return Err(Status::failed_precondition(
            "this node is not run by skeind, which restarts it: recover it from skeind",
        ));
    }
    let Some(addr) = my_addr else {
        return Err(Status::failed_precondition(
            "this node is not a member of the cluster it knows",
        ));
    };
    skein_queue::store::recovery::request(
        data_dir,
        &skein_queue::store::recovery::Request { node_id: me, addr },
    )
    .map_err(|e| Status::internal(format!("could not write the recovery request: {e}")))?;
    tracing::warn!(
        last_log_index = mine,
        committed_known,
        "recovering: restarting as the single voter of a new configuration"
    );
    // Answer first: the node restarts a moment after the reply leaves.
    let restart = restart.clone();
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let _ = restart.send(Restart::Recover);
    });
    reply.recovering = true;
    Ok(reply)
}

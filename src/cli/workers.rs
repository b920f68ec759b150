//! `leasehold workers`: the worker sessions connected to any node.

use super::{human, json, print_json, print_line, Failure, Options};

/// Arguments of `leasehold workers`.
#[derive(Debug, clap::Args)]
pub struct WorkersArgs {
    /// Where the server is, and how to print.
    #[command(flatten)]
    pub(crate) options: Options,
}

pub(super) async fn run(args: WorkersArgs) -> Result<(), Failure> {
    let client = args.options.connect().await?;
    let sessions = client.workers().await?;
    if args.options.json {
        for session in &sessions {
            print_json(&json::worker(session))?;
        }
        return Ok(());
    }
    if sessions.is_empty() {
        return print_line("no workers connected");
    }
    let mut table = human::table(
        &[
            "WORKER",
            "SESSION",
            "NODE",
            "TYPES",
            "SLOTS",
            "IN FLIGHT",
            "CONNECTED",
            "LAST SEEN",
            "STATE",
            "LABELS",
        ],
        &[4, 5],
    );
    for s in &sessions {
        let types = if s.task_types.is_empty() {
            "*".to_owned()
        } else {
            s.task_types.join(",")
        };
        let mut labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        table.add_row(vec![
            s.worker_id.clone(),
            s.session_id.clone(),
            s.node_id.clone(),
            types,
            s.slots.to_string(),
            s.in_flight.to_string(),
            human::time(s.connected_at.as_ref()),
            human::time(s.last_seen_at.as_ref()),
            if s.draining { "draining" } else { "active" }.to_owned(),
            human::or_none(Some(&labels.join(","))),
        ]);
    }
    print_line(human::render(&table))
}

//! The messages of the contract as JSON, for `--json` output: the one place
//! that decides how they look.
//!
//! The mapping is protobuf's JSON mapping with the field names of the
//! `.proto` files (`task_type`, as when a protobuf printer keeps field
//! names), so any protobuf library can read it back:
//! - enums by name (`"TASK_STATUS_COMPLETED"`);
//! - timestamps as RFC 3339 in UTC (`"2026-11-28T17:15:26.553174Z"`),
//!   durations as seconds (`"1.5s"`);
//! - `params`, `result` and `labels` as JSON objects;
//! - 64-bit integers as JSON numbers (every count fits in a double);
//! - scalars always present, even when zero or empty; optional fields and
//!   messages that are not set left out.

use serde_json::{json, Map, Value};

use crate::client::{from_struct, Result};
use crate::proto;

/// A task, with `params` and `result` as JSON objects.
pub(crate) fn task(task: &proto::Task) -> Result<Value> {
    let mut out = Map::new();
    out.insert("id".into(), json!(task.id));
    out.insert("task_type".into(), json!(task.task_type));
    out.insert("status".into(), status(task.status));
    out.insert("priority".into(), json!(task.priority));
    out.insert("attempts".into(), json!(task.attempts));
    out.insert("max_attempts".into(), json!(task.max_attempts));
    put_time(&mut out, "scheduled_for", task.scheduled_for.as_ref());
    put_time(&mut out, "created_at", task.created_at.as_ref());
    put_time(&mut out, "started_at", task.started_at.as_ref());
    put_time(&mut out, "completed_at", task.completed_at.as_ref());
    put_str(&mut out, "locked_by", task.locked_by.as_deref());
    put_time(&mut out, "locked_until", task.locked_until.as_ref());
    put_str(&mut out, "last_error", task.last_error.as_deref());
    if let Some(params) = &task.params {
        out.insert("params".into(), from_struct(params)?);
    }
    if let Some(result) = &task.result {
        out.insert("result".into(), from_struct(result)?);
    }
    put_str(&mut out, "library_id", task.library_id.as_deref());
    put_str(&mut out, "series_id", task.series_id.as_deref());
    put_str(&mut out, "book_id", task.book_id.as_deref());
    put_str(&mut out, "dedup_key", task.dedup_key.as_deref());
    if let Some(p) = &task.progress {
        out.insert("progress".into(), progress(p));
    }
    Ok(Value::Object(out))
}

/// The answer to a create: the task and whether it was deduplicated.
pub(crate) fn created(response: &proto::CreateTaskResponse) -> Result<Value> {
    let mut out = Map::new();
    if let Some(t) = &response.task {
        out.insert("task".into(), task(t)?);
    }
    out.insert("deduplicated".into(), json!(response.deduplicated));
    Ok(Value::Object(out))
}

/// Progress as its worker reported it.
pub(crate) fn progress(progress: &proto::TaskProgress) -> Value {
    let mut out = Map::new();
    out.insert("current".into(), json!(progress.current));
    out.insert("total".into(), json!(progress.total));
    out.insert("message".into(), json!(progress.message));
    put_time(&mut out, "updated_at", progress.updated_at.as_ref());
    Value::Object(out)
}

/// Counts per status, overall and per task type.
pub(crate) fn stats(stats: &proto::GetStatsResponse) -> Value {
    let mut out = Map::new();
    if let Some(totals) = &stats.totals {
        out.insert("totals".into(), counts(totals));
    }
    let types = stats
        .task_types
        .iter()
        .map(|t| {
            let mut entry = Map::new();
            entry.insert("task_type".into(), json!(t.task_type));
            if let Some(c) = &t.counts {
                entry.insert("counts".into(), counts(c));
            }
            put_duration(
                &mut entry,
                "oldest_due_pending_age",
                t.oldest_due_pending_age.as_ref(),
            );
            Value::Object(entry)
        })
        .collect();
    out.insert("task_types".into(), Value::Array(types));
    put_duration(
        &mut out,
        "oldest_due_pending_age",
        stats.oldest_due_pending_age.as_ref(),
    );
    Value::Object(out)
}

fn counts(c: &proto::StatusCounts) -> Value {
    json!({
        "pending": c.pending,
        "processing": c.processing,
        "completed": c.completed,
        "failed": c.failed,
        "cancelled": c.cancelled,
        "total": c.total,
    })
}

/// One connected worker session.
pub(crate) fn worker(session: &proto::WorkerSession) -> Value {
    let mut out = Map::new();
    out.insert("worker_id".into(), json!(session.worker_id));
    out.insert("session_id".into(), json!(session.session_id));
    out.insert("node_id".into(), json!(session.node_id));
    out.insert("task_types".into(), json!(session.task_types));
    out.insert("slots".into(), json!(session.slots));
    out.insert("in_flight".into(), json!(session.in_flight));
    put_time(&mut out, "connected_at", session.connected_at.as_ref());
    put_time(&mut out, "last_seen_at", session.last_seen_at.as_ref());
    // Sorted, so equal sessions print equal lines.
    let labels: Map<String, Value> = session
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect::<std::collections::BTreeMap<_, _>>()
        .into_iter()
        .collect();
    out.insert("labels".into(), Value::Object(labels));
    out.insert("draining".into(), json!(session.draining));
    Value::Object(out)
}

/// One item of a watch: `{"event": {...}}` or `{"missed": {"count": n}}`.
pub(crate) fn watch(item: &proto::WatchTasksResponse) -> Value {
    use proto::watch_tasks_response::Kind;
    match &item.kind {
        Some(Kind::Event(e)) => json!({ "event": event(e) }),
        Some(Kind::Missed(m)) => json!({ "missed": { "count": m.count } }),
        None => json!({}),
    }
}

/// One change of one task.
pub(crate) fn event(event: &proto::TaskEvent) -> Value {
    let mut out = Map::new();
    let kind = proto::TaskEventKind::try_from(event.kind)
        .map(|k| json!(k.as_str_name()))
        .unwrap_or_else(|_| json!(event.kind));
    out.insert("kind".into(), kind);
    out.insert("task_id".into(), json!(event.task_id));
    out.insert("task_type".into(), json!(event.task_type));
    out.insert("status".into(), status(event.status));
    out.insert("attempts".into(), json!(event.attempts));
    put_str(&mut out, "worker_id", event.worker_id.as_deref());
    if let Some(p) = &event.progress {
        out.insert("progress".into(), progress(p));
    }
    put_str(&mut out, "library_id", event.library_id.as_deref());
    put_str(&mut out, "series_id", event.series_id.as_deref());
    put_str(&mut out, "book_id", event.book_id.as_deref());
    put_time(&mut out, "occurred_at", event.occurred_at.as_ref());
    put_str(&mut out, "error", event.error.as_deref());
    Value::Object(out)
}

/// A status by name; a value this build does not know stays a number, as
/// the protobuf JSON mapping prints unknown enum values.
fn status(value: i32) -> Value {
    proto::TaskStatus::try_from(value)
        .map(|s| json!(s.as_str_name()))
        .unwrap_or_else(|_| json!(value))
}

fn put_str(out: &mut Map<String, Value>, key: &str, value: Option<&str>) {
    if let Some(value) = value {
        out.insert(key.into(), json!(value));
    }
}

fn put_time(out: &mut Map<String, Value>, key: &str, value: Option<&prost_types::Timestamp>) {
    if let Some(text) = value.and_then(timestamp) {
        out.insert(key.into(), json!(text));
    }
}

fn put_duration(out: &mut Map<String, Value>, key: &str, value: Option<&prost_types::Duration>) {
    if let Some(value) = value {
        out.insert(key.into(), json!(duration(value)));
    }
}

/// RFC 3339 in UTC with 0, 3, 6 or 9 fractional digits, whichever is
/// exact; `None` outside 1970 to 9999, which no task leaves.
pub(crate) fn timestamp(value: &prost_types::Timestamp) -> Option<String> {
    let time = super::human::printable_time(value)?;
    let nanos = time
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let text = if nanos == 0 {
        humantime::format_rfc3339_seconds(time).to_string()
    } else if nanos % 1_000_000 == 0 {
        humantime::format_rfc3339_millis(time).to_string()
    } else if nanos % 1_000 == 0 {
        humantime::format_rfc3339_micros(time).to_string()
    } else {
        humantime::format_rfc3339_nanos(time).to_string()
    };
    Some(text)
}

/// Seconds with as many fractional digits as needed: `"12s"`, `"1.5s"`.
pub(crate) fn duration(value: &prost_types::Duration) -> String {
    let negative = value.seconds < 0 || value.nanos < 0;
    let seconds = value.seconds.unsigned_abs();
    let nanos = value.nanos.unsigned_abs();
    let sign = if negative { "-" } else { "" };
    if nanos == 0 {
        return format!("{sign}{seconds}s");
    }
    let fraction = format!("{nanos:09}");
    format!("{sign}{seconds}.{}s", fraction.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_keep_exactly_their_precision() {
        let t = |seconds, nanos| prost_types::Timestamp { seconds, nanos };
        assert_eq!(
            timestamp(&t(1_795_886_126, 0)).unwrap(),
            "2026-11-28T17:15:26Z"
        );
        assert_eq!(
            timestamp(&t(1_795_886_126, 553_174_000)).unwrap(),
            "2026-11-28T17:15:26.553174Z"
        );
        assert_eq!(
            timestamp(&t(1_795_886_126, 500_000_000)).unwrap(),
            "2026-11-28T17:15:26.500Z"
        );
        assert_eq!(timestamp(&t(-5, 0)), None);
    }

    #[test]
    fn durations_are_seconds() {
        let d = |seconds, nanos| prost_types::Duration { seconds, nanos };
        assert_eq!(duration(&d(12, 0)), "12s");
        assert_eq!(duration(&d(1, 500_000_000)), "1.5s");
        assert_eq!(duration(&d(0, 1)), "0.000000001s");
    }

    #[test]
    fn tasks_name_enums_and_leave_out_what_is_unset() {
        let t = proto::Task {
            id: "i".into(),
            task_type: "scan".into(),
            status: proto::TaskStatus::Pending as i32,
            params: Some(crate::client::to_struct(&json!({"a": [1, "x"]}))),
            ..Default::default()
        };
        let value = task(&t).unwrap();
        assert_eq!(value["status"], "TASK_STATUS_PENDING");
        assert_eq!(value["params"], json!({"a": [1, "x"]}));
        assert_eq!(value["priority"], 0);
        assert!(value.get("result").is_none());
        assert!(value.get("locked_by").is_none());
    }
}

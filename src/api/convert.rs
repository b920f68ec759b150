//! Conversions between the wire types and the domain: JSON objects as
//! `google.protobuf.Struct`, times as `Timestamp`, tasks and leases.

use std::time::{Duration, SystemTime};

use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Value};

use crate::events::{Event, EventKind};
use crate::proto;
use crate::store::SessionRow;
use crate::task::{Counts, Progress, Stats, Status, Task, TypeStats};

/// A JSON value as a protobuf `Value`.
pub fn json_to_value(json: &serde_json::Value) -> Value {
    let kind = match json {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(items) => Kind::ListValue(ListValue {
            values: items.iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(map) => Kind::StructValue(json_to_struct_map(map)),
    };
    Value { kind: Some(kind) }
}

fn json_to_struct_map(map: &serde_json::Map<String, serde_json::Value>) -> Struct {
    Struct {
        fields: map
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect(),
    }
}

/// A JSON object as a `Struct`; anything but an object becomes an empty one.
pub fn json_to_struct(json: &serde_json::Value) -> Struct {
    match json {
        serde_json::Value::Object(map) => json_to_struct_map(map),
        _ => Struct::default(),
    }
}

/// Why a `Struct` cannot be stored as JSON.
#[derive(Debug, PartialEq, Eq)]
pub struct JsonError(pub String);

/// A `Struct` as a JSON object. Rejects what JSON (and Postgres `jsonb`)
/// cannot hold: NaN and infinite numbers, and NUL characters.
pub fn struct_to_json(s: &Struct) -> Result<serde_json::Value, JsonError> {
    let mut map = serde_json::Map::with_capacity(s.fields.len());
    for (key, value) in &s.fields {
        if key.contains('\0') {
            return Err(JsonError("keys must not contain NUL characters".into()));
        }
        map.insert(key.clone(), value_to_json(value)?);
    }
    Ok(serde_json::Value::Object(map))
}

fn value_to_json(value: &Value) -> Result<serde_json::Value, JsonError> {
    Ok(match &value.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::NumberValue(n)) => {
            // Whole numbers stay integers, so `{"count": 3}` reads back as 3.
            if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 {
                serde_json::Value::from(*n as i64)
            } else {
                serde_json::Number::from_f64(*n)
                    .map(serde_json::Value::Number)
                    .ok_or_else(|| JsonError("numbers must be finite".into()))?
            }
        }
        Some(Kind::StringValue(s)) => {
            if s.contains('\0') {
                return Err(JsonError("strings must not contain NUL characters".into()));
            }
            serde_json::Value::String(s.clone())
        }
        Some(Kind::ListValue(list)) => serde_json::Value::Array(
            list.values
                .iter()
                .map(value_to_json)
                .collect::<Result<_, _>>()?,
        ),
        Some(Kind::StructValue(s)) => struct_to_json(s)?,
    })
}

/// A time as a `Timestamp`.
pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    t.into()
}

/// A duration as a protobuf `Duration`.
pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        // Saturates: a duration past i64 seconds (`Duration::MAX`, meant as
        // "never") must not wrap into a negative one.
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

/// The wire value of a status.
pub fn status_to_proto(status: Status) -> proto::TaskStatus {
    match status {
        Status::Pending => proto::TaskStatus::Pending,
        Status::Processing => proto::TaskStatus::Processing,
        Status::Completed => proto::TaskStatus::Completed,
        Status::Failed => proto::TaskStatus::Failed,
        Status::Cancelled => proto::TaskStatus::Cancelled,
    }
}

/// A task on the wire.
pub fn task_to_proto(task: &Task) -> proto::Task {
    proto::Task {
        id: task.id.to_string(),
        task_type: task.task_type.clone(),
        status: status_to_proto(task.status) as i32,
        priority: task.priority,
        attempts: task.attempts,
        max_attempts: task.max_attempts,
        scheduled_for: Some(timestamp(task.scheduled_for)),
        created_at: Some(timestamp(task.created_at)),
        started_at: task.started_at.map(timestamp),
        completed_at: task.completed_at.map(timestamp),
        locked_by: task.locked_by.clone(),
        locked_until: task.locked_until.map(timestamp),
        last_error: task.last_error.clone(),
        params: Some(json_to_struct(&task.params)),
        result: task.result.as_ref().map(json_to_struct),
        library_id: task.library_id.map(|id| id.to_string()),
        series_id: task.series_id.map(|id| id.to_string()),
        book_id: task.book_id.map(|id| id.to_string()),
        dedup_key: task.dedup_key.clone(),
        progress: task.progress.as_ref().map(progress_to_proto),
    }
}

/// Progress on the wire.
pub fn progress_to_proto(progress: &Progress) -> proto::TaskProgress {
    proto::TaskProgress {
        current: progress.current,
        total: progress.total,
        message: progress.message.clone(),
        updated_at: progress.updated_at.map(timestamp),
    }
}

fn event_kind_to_proto(kind: EventKind) -> proto::TaskEventKind {
    match kind {
        EventKind::Created => proto::TaskEventKind::Created,
        EventKind::Leased => proto::TaskEventKind::Leased,
        EventKind::Progress => proto::TaskEventKind::Progress,
        EventKind::Completed => proto::TaskEventKind::Completed,
        EventKind::Failed => proto::TaskEventKind::Failed,
        EventKind::Retried => proto::TaskEventKind::Retried,
        EventKind::Cancelled => proto::TaskEventKind::Cancelled,
        EventKind::LeaseExpired => proto::TaskEventKind::LeaseExpired,
        EventKind::Released => proto::TaskEventKind::Released,
    }
}

/// A task event on the wire.
pub fn event_to_proto(event: &Event) -> proto::TaskEvent {
    proto::TaskEvent {
        kind: event_kind_to_proto(event.kind) as i32,
        task_id: event.task_id.to_string(),
        task_type: event.task_type.clone(),
        status: status_to_proto(event.status) as i32,
        attempts: event.attempts,
        worker_id: event.worker_id.clone(),
        progress: event.progress.as_ref().map(progress_to_proto),
        library_id: event.library_id.map(|id| id.to_string()),
        series_id: event.series_id.map(|id| id.to_string()),
        book_id: event.book_id.map(|id| id.to_string()),
        occurred_at: Some(timestamp(event.at)),
        error: event.error.clone(),
    }
}

/// A worker session row on the wire.
pub fn session_to_proto(row: &SessionRow) -> proto::WorkerSession {
    proto::WorkerSession {
        worker_id: row.worker_id.clone(),
        session_id: row.id.to_string(),
        node_id: row.node_id.to_string(),
        task_types: row.task_types.clone(),
        slots: row.slots,
        in_flight: row.in_flight,
        connected_at: Some(timestamp(row.connected_at)),
        last_seen_at: Some(timestamp(row.last_seen_at)),
        labels: row
            .labels
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .unwrap_or_default(),
        draining: row.draining,
    }
}

/// A freshly claimed task with its lease.
pub fn leased_to_proto(task: &Task) -> proto::LeasedTask {
    proto::LeasedTask {
        lease: Some(proto::Lease {
            task_id: task.id.to_string(),
            lease_token: task.lease_token.map(|t| t.to_string()).unwrap_or_default(),
            worker_id: task.locked_by.clone().unwrap_or_default(),
            locked_until: task.locked_until.map(timestamp),
            attempt: task.attempts,
        }),
        task: Some(task_to_proto(task)),
    }
}

fn counts_to_proto(counts: &Counts) -> proto::StatusCounts {
    proto::StatusCounts {
        pending: counts.pending,
        processing: counts.processing,
        completed: counts.completed,
        failed: counts.failed,
        cancelled: counts.cancelled,
        total: counts.total(),
    }
}

/// Statistics on the wire.
pub fn stats_to_proto(stats: &Stats) -> proto::GetStatsResponse {
    proto::GetStatsResponse {
        totals: Some(counts_to_proto(&stats.totals)),
        task_types: stats
            .task_types
            .iter()
            .map(|t: &TypeStats| proto::TaskTypeStats {
                task_type: t.task_type.clone(),
                counts: Some(counts_to_proto(&t.counts)),
                oldest_due_pending_age: t.oldest_due_pending_age.map(duration),
            })
            .collect(),
        oldest_due_pending_age: stats.oldest_due_pending_age.map(duration),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_past_i64_seconds_saturate() {
        assert_eq!(duration(Duration::MAX).seconds, i64::MAX);
        assert_eq!(duration(Duration::from_millis(1500)).nanos, 500_000_000);
    }

    #[test]
    fn json_round_trips_through_struct() {
        let json = serde_json::json!({
            "mode": "deep", "count": 3, "ratio": 0.5, "ok": true, "none": null,
            "ids": ["a", "b"], "nested": {"x": -7}
        });
        assert_eq!(struct_to_json(&json_to_struct(&json)).unwrap(), json);
    }

    #[test]
    fn non_finite_numbers_and_nul_are_rejected() {
        let mut s = Struct::default();
        s.fields.insert(
            "x".into(),
            Value {
                kind: Some(Kind::NumberValue(f64::NAN)),
            },
        );
        assert!(struct_to_json(&s).is_err());
        let mut s = Struct::default();
        s.fields.insert(
            "x".into(),
            Value {
                kind: Some(Kind::StringValue("a\0b".into())),
            },
        );
        assert!(struct_to_json(&s).is_err());
    }
}

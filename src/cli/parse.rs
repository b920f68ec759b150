//! Command-line values checked before any call: JSON objects, durations,
//! times, statuses, and the task lines of `task create --from-file`.
//! Anything rejected here is a usage error (exit 2).

use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::client::NewTask;
use crate::model::Status;
use crate::wire::request;

/// Task statuses are typed as the server stores them (`pending`, ...).
impl clap::ValueEnum for Status {
    fn value_variants<'a>() -> &'a [Self] {
        &Status::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.as_str()))
    }
}

/// A terminal status, the only kind `task purge` deletes.
pub(crate) fn finished() -> impl clap::builder::TypedValueParser<Value = Status> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(Status::TERMINAL.map(Status::as_str))
        .try_map(|s: String| Status::parse(&s).ok_or("not a task status"))
}

/// A JSON object (`--params '{"mode": "deep"}'`).
pub(crate) fn json_object(text: &str) -> Result<Value, String> {
    match serde_json::from_str(text) {
        Ok(value @ Value::Object(_)) => Ok(value),
        Ok(_) => Err("must be a JSON object, e.g. '{\"mode\": \"deep\"}'".to_owned()),
        Err(err) => Err(format!("not valid JSON: {err}")),
    }
}

/// A duration with units: `500ms`, `10s`, `7d`, `1h 30m`.
pub(crate) fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|err| format!("{err} (e.g. 30s, 10m, 7d)"))
}

/// A time in UTC, RFC 3339: `2026-12-01T10:00:00Z` (the `T` may be a space;
/// fractional seconds are allowed).
pub(crate) fn time(text: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339_weak(text)
        .map_err(|err| format!("{err} (expected UTC, e.g. 2026-12-01T10:00:00Z)"))
}

/// One line of `task create --from-file`: a JSON object with the fields of
/// `CreateTaskRequest` (`task_type` required; `params`, `priority`,
/// `max_attempts`, `scheduled_for` as RFC 3339, `library_id`, `series_id`,
/// `book_id`, `dedup_key` optional). Unknown fields are rejected, so that a
/// typo is not silently dropped, and the whole request gets the server's
/// own checks (the task type's characters, UUIDs, ranges and lengths), so
/// that a file of several calls is not refused halfway. Only what depends
/// on the server's configuration — the size limit of `params` — is left to
/// it.
pub(crate) fn task_line(line: &str) -> Result<NewTask, String> {
    let value: Value =
        serde_json::from_str(line).map_err(|err| format!("not valid JSON: {err}"))?;
    let Value::Object(fields) = value else {
        return Err("must be a JSON object".to_owned());
    };
    let text = |key: &str, value: &Value| -> Result<String, String> {
        value
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("{key} must be a string"))
    };
    let int = |key: &str, value: &Value| -> Result<i32, String> {
        value
            .as_i64()
            .and_then(|n| i32::try_from(n).ok())
            .ok_or_else(|| format!("{key} must be a 32-bit integer"))
    };
    let task_type = match fields.get("task_type") {
        Some(value) => text("task_type", value)?,
        None => return Err("task_type is required".to_owned()),
    };
    let mut task = NewTask::new(task_type);
    for (key, value) in &fields {
        task = match key.as_str() {
            "task_type" => task,
            "params" => match value {
                Value::Object(_) => task.params(value.clone()),
                _ => return Err("params must be a JSON object".to_owned()),
            },
            "priority" => task.priority(int(key, value)?),
            "max_attempts" => task.max_attempts(int(key, value)?),
            "scheduled_for" => {
                task.scheduled_for(time(&text(key, value)?).map_err(|err| format!("{key}: {err}"))?)
            }
            "library_id" => task.library_id(text(key, value)?),
            "series_id" => task.series_id(text(key, value)?),
            "book_id" => task.book_id(text(key, value)?),
            "dedup_key" => task.dedup_key(text(key, value)?),
            other => return Err(format!("unknown field {other:?}")),
        };
    }
    let request = task
        .clone()
        .into_request(None)
        .map_err(|err| err.to_string())?;
    request::new_task(&request, usize::MAX).map_err(|err| err.to_string())?;
    Ok(task)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_must_be_an_object() {
        assert!(json_object(r#"{"a": 1}"#).is_ok());
        assert!(json_object("[1]").unwrap_err().contains("JSON object"));
        assert!(json_object("{nope").unwrap_err().contains("not valid JSON"));
    }

    #[test]
    fn durations_and_times_need_units_and_utc() {
        assert_eq!(duration("7d").unwrap(), Duration::from_secs(7 * 86_400));
        assert!(duration("7").is_err());
        assert!(time("2026-12-01T10:00:00Z").is_ok());
        assert!(time("yesterday").is_err());
    }

    #[test]
    fn task_lines_take_the_request_fields_and_refuse_others() {
        let task = task_line(
            r#"{"task_type": "scan", "priority": 5, "params": {"a": 1}, "dedup_key": "k"}"#,
        )
        .unwrap();
        assert_eq!(task.task_type(), "scan");
        assert_eq!(
            task_line(r#"{"priority": 5}"#).unwrap_err(),
            "task_type is required"
        );
        assert_eq!(
            task_line(r#"{"task_type": "scan", "prio": 5}"#).unwrap_err(),
            "unknown field \"prio\""
        );
        assert!(task_line(r#"{"task_type": "scan", "priority": "high"}"#)
            .unwrap_err()
            .contains("priority"));
        assert!(task_line("[]").is_err());
    }

    #[test]
    fn task_lines_get_the_servers_field_checks() {
        let refused = |line: Value| task_line(&line.to_string()).unwrap_err();
        let spaced = refused(serde_json::json!({"task_type": "scan library"}));
        assert!(
            spaced.starts_with("task_type: ' ' is not allowed"),
            "{spaced}"
        );
        assert_eq!(
            refused(serde_json::json!({"task_type": "t", "book_id": "nope"})),
            r#"book_id: "nope" is not a UUID"#
        );
        assert_eq!(
            refused(serde_json::json!({"task_type": "t", "max_attempts": 1001})),
            "max_attempts: must be between 0 and 1000"
        );
        assert_eq!(
            refused(serde_json::json!({"task_type": "t", "dedup_key": ""})),
            "dedup_key: is required"
        );
        assert!(task_line(
            &serde_json::json!({
                "task_type": "scan.v2:deep/x-y",
                "max_attempts": 1000,
                "library_id": "3f2b8c1e-7a4d-4e6f-9b0a-5c1d2e3f4a5b",
                "dedup_key": "k",
            })
            .to_string()
        )
        .is_ok());
    }
}

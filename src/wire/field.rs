//! Checks of single fields, shared by every request that has them. Each
//! failure is an `INVALID_ARGUMENT` that names the field as the caller
//! passes it (`tasks[3].task_type`), and nothing is ever half accepted.

use std::time::{Duration, SystemTime};

use uuid::Uuid;

use super::limit::*;
use super::{json, proto};
use crate::error::Error;
use crate::model::{LeaseRef, Status};

type Result<T> = std::result::Result<T, Error>;

/// A UUID in its text form.
pub(crate) fn uuid(field: &str, value: &str) -> Result<Uuid> {
    if value.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    Uuid::parse_str(value).map_err(|_| Error::invalid(field, format!("{value:?} is not a UUID")))
}

/// A lease reference: `task_id` and `lease_token`, both UUIDs.
pub(crate) fn lease_ref(task_id: &str, lease_token: &str) -> Result<LeaseRef> {
    Ok(LeaseRef {
        task_id: uuid("task_id", task_id)?,
        lease_token: uuid("lease_token", lease_token)?,
    })
}

/// The leases of a heartbeat (`field` is `leases` or `heartbeat.leases`):
/// at most [`MAX_HEARTBEAT_LEASES`], each a valid lease reference; errors
/// name the entry, e.g. `leases[3].lease_token`.
pub(crate) fn lease_renewals(field: &str, leases: &[proto::LeaseRenewal]) -> Result<Vec<LeaseRef>> {
    if leases.len() > MAX_HEARTBEAT_LEASES {
        return Err(Error::invalid(
            field,
            format!("at most {MAX_HEARTBEAT_LEASES} leases"),
        ));
    }
    leases
        .iter()
        .enumerate()
        .map(|(i, l)| {
            lease_ref(&l.task_id, &l.lease_token).map_err(|e| e.within(&format!("{field}[{i}].")))
        })
        .collect()
}

/// An optional UUID.
pub(crate) fn opt_uuid(field: &str, value: Option<&str>) -> Result<Option<Uuid>> {
    value.map(|v| uuid(field, v)).transpose()
}

/// A task type: 1 to 64 letters, digits and `_ . : / -`.
pub(crate) fn task_type(field: &str, value: &str) -> Result<String> {
    if value.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    if value.chars().count() > TASK_TYPE_MAX_CHARS {
        return Err(Error::invalid(
            field,
            format!("must be at most {TASK_TYPE_MAX_CHARS} characters"),
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "_.:/-".contains(*c)))
    {
        return Err(Error::invalid(
            field,
            format!("{c:?} is not allowed: use letters, digits and _ . : / -"),
        ));
    }
    Ok(value.to_owned())
}

/// A list of task types.
pub(crate) fn task_types(field: &str, values: &[String]) -> Result<Vec<String>> {
    if values.len() > MAX_FILTER_VALUES {
        return Err(Error::invalid(
            field,
            format!("at most {MAX_FILTER_VALUES} values"),
        ));
    }
    values
        .iter()
        .enumerate()
        .map(|(i, v)| task_type(&format!("{field}[{i}]"), v))
        .collect()
}

/// Free text with a length limit and no NUL or other control characters
/// (newlines and tabs allowed when `multiline`).
fn text(field: &str, value: &str, min: usize, max: usize, multiline: bool) -> Result<String> {
    let chars = value.chars().count();
    if chars < min {
        return Err(Error::invalid(field, "is required"));
    }
    if chars > max {
        return Err(Error::invalid(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    if value
        .chars()
        .any(|c| c.is_control() && !(multiline && (c == '\n' || c == '\r' || c == '\t')))
    {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    Ok(value.to_owned())
}

/// Session labels: at most 64, keys 1 to 256 characters, values up to 256.
pub(crate) fn labels(
    field: &str,
    value: &std::collections::HashMap<String, String>,
) -> Result<serde_json::Value> {
    if value.len() > MAX_LABELS {
        return Err(Error::invalid(
            field,
            format!("at most {MAX_LABELS} labels"),
        ));
    }
    let mut map = serde_json::Map::new();
    for (k, v) in value {
        let key = text(&format!("{field}.key"), k, 1, LABEL_MAX_CHARS, false)?;
        let val = text(&format!("{field}[{k}]"), v, 0, LABEL_MAX_CHARS, false)?;
        map.insert(key, serde_json::Value::String(val));
    }
    Ok(serde_json::Value::Object(map))
}

/// A progress message.
pub(crate) fn progress_message(field: &str, value: &str) -> Result<String> {
    text(field, value, 0, PROGRESS_MESSAGE_MAX_CHARS, true)
}

/// A worker id: 1 to 100 characters.
pub(crate) fn worker_id(field: &str, value: &str) -> Result<String> {
    text(field, value, 1, WORKER_ID_MAX_CHARS, false)
}

/// A dedup key: 1 to 255 characters.
pub(crate) fn dedup_key(field: &str, value: Option<&str>) -> Result<Option<String>> {
    value
        .map(|v| text(field, v, 1, DEDUP_KEY_MAX_CHARS, false))
        .transpose()
}

/// A token's description: free text, at most 200 characters; may be empty.
pub(crate) fn description(field: &str, value: &str) -> Result<String> {
    text(field, value, 0, 200, false)
}

/// A token role: UNSPECIFIED and unknown values are rejected.
pub(crate) fn role(field: &str, value: i32) -> Result<crate::model::Role> {
    use crate::model::Role;
    match proto::TokenRole::try_from(value) {
        Ok(proto::TokenRole::Worker) => Ok(Role::Worker),
        Ok(proto::TokenRole::Producer) => Ok(Role::Producer),
        Ok(proto::TokenRole::Admin) => Ok(Role::Admin),
        Ok(proto::TokenRole::Unspecified) => Err(Error::invalid(
            field,
            "TOKEN_ROLE_UNSPECIFIED is not a role: give worker, producer or admin",
        )),
        Err(_) => Err(Error::invalid(
            field,
            format!("{value} is not a known role"),
        )),
    }
}

/// A cancellation reason: empty means none.
pub(crate) fn reason(field: &str, value: &str) -> Result<Option<String>> {
    if value.is_empty() {
        return Ok(None);
    }
    text(field, value, 1, REASON_MAX_CHARS, true).map(Some)
}

/// An error report of a failed attempt.
pub(crate) fn error_text(field: &str, value: &str) -> Result<String> {
    text(field, value, 0, ERROR_MAX_CHARS, true)
}

/// A JSON object payload (`params`, `result`) of at most `max_bytes`
/// encoded; unset means `{}`.
pub(crate) fn payload(
    field: &str,
    value: Option<&prost_types::Struct>,
    max_bytes: usize,
) -> Result<serde_json::Value> {
    let Some(value) = value else {
        return Ok(serde_json::Value::Object(Default::default()));
    };
    let size = prost::Message::encoded_len(value);
    if size > max_bytes {
        return Err(Error::invalid(
            field,
            format!("is {size} bytes encoded, more than the limit of {max_bytes}"),
        ));
    }
    json::struct_to_json(value).map_err(|err| Error::invalid(field, err.0))
}

/// A duration within `[min, max]`; unset gives `default`.
pub(crate) fn duration(
    field: &str,
    value: Option<&prost_types::Duration>,
    min: Duration,
    max: Duration,
    default: Duration,
) -> Result<Duration> {
    let Some(value) = value else {
        return Ok(default);
    };
    let d = Duration::try_from(*value)
        .map_err(|_| Error::invalid(field, "must be a non-negative, well-formed duration"))?;
    if d < min || d > max {
        return Err(Error::invalid(
            field,
            format!(
                "must be between {} and {}",
                humantime::format_duration(min),
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(d)
}

/// A timestamp between 1970 and 9999, the range the store keeps exactly.
pub(crate) fn timestamp(
    field: &str,
    value: Option<&prost_types::Timestamp>,
) -> Result<Option<SystemTime>> {
    let Some(value) = value else {
        return Ok(None);
    };
    const YEAR_10000: i64 = 253_402_300_800;
    if value.seconds < 0
        || value.seconds >= YEAR_10000
        || !(0..1_000_000_000).contains(&value.nanos)
    {
        return Err(Error::invalid(
            field,
            "must be a valid time between 1970 and 9999",
        ));
    }
    SystemTime::try_from(*value)
        .map(Some)
        .map_err(|_| Error::invalid(field, "must be a valid time between 1970 and 9999"))
}

/// A status in a filter: UNSPECIFIED and unknown values are rejected.
pub(crate) fn status(field: &str, value: i32) -> Result<Status> {
    match proto::TaskStatus::try_from(value) {
        Ok(proto::TaskStatus::Pending) => Ok(Status::Pending),
        Ok(proto::TaskStatus::Processing) => Ok(Status::Processing),
        Ok(proto::TaskStatus::Completed) => Ok(Status::Completed),
        Ok(proto::TaskStatus::Failed) => Ok(Status::Failed),
        Ok(proto::TaskStatus::Cancelled) => Ok(Status::Cancelled),
        Ok(proto::TaskStatus::Unspecified) => Err(Error::invalid(
            field,
            "TASK_STATUS_UNSPECIFIED is not a status",
        )),
        Err(_) => Err(Error::invalid(
            field,
            format!("{value} is not a known status"),
        )),
    }
}

/// A list of statuses.
pub(crate) fn statuses(field: &str, values: &[i32]) -> Result<Vec<Status>> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| status(&format!("{field}[{i}]"), *v))
        .collect()
}

/// An integer within `[min, max]`.
pub(crate) fn range(field: &str, value: i32, min: i32, max: i32) -> Result<i32> {
    if value < min || value > max {
        return Err(Error::invalid(
            field,
            format!("must be between {min} and {max}"),
        ));
    }
    Ok(value)
}

/// A count that must not be negative.
pub(crate) fn range64(field: &str, value: i64) -> Result<i64> {
    if value < 0 {
        return Err(Error::invalid(field, "must not be negative"));
    }
    Ok(value)
}

/// Encodes a listing position (the last task of a page) as an opaque page
/// token.
pub(crate) fn page_token_encode(last: Uuid) -> String {
    format!("v2.{}", last.simple())
}

/// Decodes a page token; empty means the first page.
pub(crate) fn page_token(field: &str, value: &str) -> Result<Option<Uuid>> {
    if value.is_empty() {
        return Ok(None);
    }
    if value.starts_with("v1.") {
        // Earlier versions' tokens held a creation number; listings now go
        // by task id, so such a token cannot be resumed.
        return Err(Error::invalid(
            field,
            "is a token of an earlier server version: list again from the first page",
        ));
    }
    value
        .strip_prefix("v2.")
        .filter(|hex| hex.len() == 32)
        .and_then(|hex| Uuid::try_parse(hex).ok())
        .map(Some)
        .ok_or_else(|| Error::invalid(field, "is not a token returned by ListTasks"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(err: Error) -> String {
        match err {
            Error::InvalidArgument { field, .. } => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn task_type_rules() {
        assert!(task_type("t", "scan_library").is_ok());
        assert!(task_type("t", "media/thumb:v2.x-y").is_ok());
        assert_eq!(field_of(task_type("t", "").unwrap_err()), "t");
        assert!(task_type("t", "has space").is_err());
        assert!(task_type("t", &"a".repeat(65)).is_err());
        assert!(task_type("t", &"a".repeat(64)).is_ok());
    }

    #[test]
    fn list_items_are_named_by_index() {
        let err = task_types("task_types", &["ok".into(), "no!".into()]).unwrap_err();
        assert_eq!(field_of(err), "task_types[1]");
        let err = statuses("statuses", &[1, 0]).unwrap_err();
        assert_eq!(field_of(err), "statuses[1]");
        assert!(statuses("statuses", &[99]).is_err());
    }

    #[test]
    fn durations_are_bounded() {
        let one = Duration::from_secs(1);
        let hour = Duration::from_secs(3600);
        let d = |s, n| prost_types::Duration {
            seconds: s,
            nanos: n,
        };
        assert_eq!(duration("d", None, one, hour, one).unwrap(), one);
        assert!(duration("d", Some(&d(0, 5)), one, hour, one).is_err());
        assert!(duration("d", Some(&d(-1, 0)), Duration::ZERO, hour, one).is_err());
        assert!(duration("d", Some(&d(3601, 0)), one, hour, one).is_err());
        assert_eq!(
            duration("d", Some(&d(2, 0)), one, hour, one).unwrap(),
            2 * one
        );
    }

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        let last = Uuid::now_v7();
        assert_eq!(
            page_token("p", &page_token_encode(last)).unwrap(),
            Some(last)
        );
        assert_eq!(page_token("p", "").unwrap(), None);
        assert!(page_token("p", "v2.zz").is_err());
        assert!(page_token("p", "v2.1234").is_err());
        assert!(page_token("p", &format!("v2.{}", last.hyphenated())).is_err());
        assert!(page_token("p", "1234").is_err());
        let old = page_token("p", "v1.4d2").unwrap_err().to_string();
        assert!(old.contains("earlier server version"), "{old}");
    }

    #[test]
    fn payload_limit_counts_encoded_bytes() {
        let json = serde_json::json!({"data": "x".repeat(100)});
        let s = json::json_to_struct(&json);
        assert!(payload("params", Some(&s), 50).is_err());
        assert_eq!(payload("params", Some(&s), 1000).unwrap(), json);
        assert_eq!(payload("params", None, 10).unwrap(), serde_json::json!({}));
    }

    #[test]
    fn timestamps_outside_the_stored_range_are_rejected() {
        let t = |s| prost_types::Timestamp {
            seconds: s,
            nanos: 0,
        };
        assert!(timestamp("ts", Some(&t(-5))).is_err());
        assert!(timestamp("ts", Some(&t(300_000_000_000))).is_err());
        assert!(timestamp("ts", Some(&t(1_700_000_000))).unwrap().is_some());
    }
}

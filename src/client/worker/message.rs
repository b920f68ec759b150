//! The messages a worker sends, built as the server accepts them: error
//! texts cleaned and cut to its limit, results as objects, delays capped,
//! and the stand-in for an outcome it refused.

use super::context::TaskError;
use crate::client::to_struct;
use crate::proto::{self, connect_request};
use crate::wire::{convert, limit};

/// The server's limit on a fail message, in characters.
const MAX_ERROR_CHARS: usize = limit::ERROR_MAX_CHARS;

/// Completes `task_id` under `lease_token` with `result`.
pub(super) fn complete(
    task_id: &str,
    lease_token: String,
    result: serde_json::Value,
) -> connect_request::Kind {
    connect_request::Kind::Complete(proto::CompleteTaskRequest {
        task_id: task_id.to_owned(),
        lease_token,
        result: Some(result_struct(result)),
    })
}

/// Fails the attempt of `task_id` under `lease_token`.
pub(super) fn fail(task_id: &str, lease_token: String, error: TaskError) -> connect_request::Kind {
    connect_request::Kind::Fail(proto::FailTaskRequest {
        task_id: task_id.to_owned(),
        lease_token,
        error: clean_error(error.message, MAX_ERROR_CHARS),
        permanent: error.permanent,
        // The server refuses a longer delay; the longest it takes is closer
        // to what was asked than its backoff.
        retry_after: error
            .retry_after
            .map(|d| convert::duration(d.min(limit::MAX_RETRY_AFTER))),
    })
}

/// Gives the lease of `task_id` back.
pub(super) fn release(task_id: &str, lease_token: String) -> connect_request::Kind {
    connect_request::Kind::Release(proto::ReleaseTaskRequest {
        task_id: task_id.to_owned(),
        lease_token,
    })
}

/// The fail that stands in for an outcome refused as invalid: for a
/// complete, a permanent fail naming the reason; for a fail, the same fail
/// without the parts that can be refused (a long message, `retry_after`).
pub(super) fn fallback(
    refused: &connect_request::Kind,
    reason: &str,
) -> Option<connect_request::Kind> {
    let fail = match refused {
        connect_request::Kind::Complete(complete) => proto::FailTaskRequest {
            task_id: complete.task_id.clone(),
            lease_token: complete.lease_token.clone(),
            error: clean_error(
                format!("the server refused the result: {reason}"),
                MAX_ERROR_CHARS,
            ),
            permanent: true,
            retry_after: None,
        },
        connect_request::Kind::Fail(fail) => proto::FailTaskRequest {
            error: clean_error(fail.error.clone(), MAX_ERROR_CHARS / 2),
            retry_after: None,
            ..fail.clone()
        },
        _ => return None,
    };
    Some(connect_request::Kind::Fail(fail))
}

/// An error message as the server accepts it: control characters other
/// than line breaks and tabs (terminal colour codes, say) replaced, and cut
/// to at most `max` characters, marked when cut.
fn clean_error(text: String, max: usize) -> String {
    const MARK: &str = " [truncated]";
    let clean = |c: char| {
        if c.is_control() && !matches!(c, '\n' | '\r' | '\t') {
            char::REPLACEMENT_CHARACTER
        } else {
            c
        }
    };
    if text.chars().count() <= max {
        return text.chars().map(clean).collect();
    }
    let keep = max.saturating_sub(MARK.chars().count());
    let mut cut: String = text.chars().take(keep).map(clean).collect();
    cut.push_str(MARK);
    cut
}

/// The lease an outcome message is about.
pub(super) fn lease_token_of(message: &connect_request::Kind) -> Option<&str> {
    match message {
        connect_request::Kind::Complete(m) => Some(&m.lease_token),
        connect_request::Kind::Fail(m) => Some(&m.lease_token),
        connect_request::Kind::Release(m) => Some(&m.lease_token),
        _ => None,
    }
}

/// A result as the `Struct` the server stores: objects as they are, any
/// other value under `"value"`.
fn result_struct(result: serde_json::Value) -> prost_types::Struct {
    match result {
        serde_json::Value::Object(_) => to_struct(&result),
        other => to_struct(&serde_json::json!({ "value": other })),
    }
}

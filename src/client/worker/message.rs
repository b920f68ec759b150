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

/// `messages` as they go on the stream: outcomes (completes, fails,
/// releases) that follow each other packed into `outcomes` messages of up to
/// [`limit::MAX_OUTCOMES`] and about [`limit::MAX_OUTCOME_BATCH_BYTES`]
/// (a larger outcome alone), everything else as it is, the order kept. A
/// lone outcome keeps its single form.
pub(super) fn packed(messages: Vec<connect_request::Kind>) -> Vec<connect_request::Kind> {
    let mut out = Vec::with_capacity(messages.len());
    let mut run: Vec<proto::Outcome> = Vec::new();
    let mut bytes = 0;
    let flush =
        |run: &mut Vec<proto::Outcome>, out: &mut Vec<connect_request::Kind>| match run.len() {
            0 => {}
            1 => out.extend(run.pop().and_then(|o| o.kind).map(single)),
            _ => out.push(connect_request::Kind::Outcomes(proto::OutcomeBatch {
                outcomes: std::mem::take(run),
            })),
        };
    for message in messages {
        let kind = match message {
            connect_request::Kind::Complete(m) => proto::outcome::Kind::Complete(m),
            connect_request::Kind::Fail(m) => proto::outcome::Kind::Fail(m),
            connect_request::Kind::Release(m) => proto::outcome::Kind::Release(m),
            other => {
                flush(&mut run, &mut out);
                out.push(other);
                continue;
            }
        };
        let outcome = proto::Outcome { kind: Some(kind) };
        let len = prost::Message::encoded_len(&outcome);
        if !run.is_empty() && bytes + len > limit::MAX_OUTCOME_BATCH_BYTES {
            flush(&mut run, &mut out);
            bytes = 0;
        }
        run.push(outcome);
        bytes += len;
        if run.len() == limit::MAX_OUTCOMES {
            flush(&mut run, &mut out);
            bytes = 0;
        }
    }
    flush(&mut run, &mut out);
    out
}

/// An outcome in its single form.
fn single(kind: proto::outcome::Kind) -> connect_request::Kind {
    match kind {
        proto::outcome::Kind::Complete(m) => connect_request::Kind::Complete(m),
        proto::outcome::Kind::Fail(m) => connect_request::Kind::Fail(m),
        proto::outcome::Kind::Release(m) => connect_request::Kind::Release(m),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(n: u32) -> connect_request::Kind {
        super::complete(&n.to_string(), String::new(), serde_json::json!({}))
    }

    #[test]
    fn outcomes_in_a_row_travel_together_and_the_rest_keeps_its_place() {
        let drain = connect_request::Kind::Drain(proto::DrainSession {});
        let sent = packed(vec![
            complete(1),
            drain.clone(),
            complete(2),
            release("3", String::new()),
            complete(4),
        ]);
        assert_eq!(sent.len(), 3);
        assert_eq!(sent[0], complete(1), "a lone outcome stays single");
        assert_eq!(sent[1], drain);
        let connect_request::Kind::Outcomes(batch) = &sent[2] else {
            panic!("{:?}", sent[2]);
        };
        let ids: Vec<String> = batch
            .outcomes
            .iter()
            .map(|o| match o.kind.as_ref().unwrap() {
                proto::outcome::Kind::Complete(m) => m.task_id.clone(),
                proto::outcome::Kind::Release(m) => m.task_id.clone(),
                proto::outcome::Kind::Fail(m) => m.task_id.clone(),
            })
            .collect();
        assert_eq!(ids, ["2", "3", "4"]);

        let many = packed((0..2500).map(complete).collect());
        let sizes: Vec<usize> = many
            .iter()
            .map(|m| match m {
                connect_request::Kind::Outcomes(b) => b.outcomes.len(),
                _ => 1,
            })
            .collect();
        assert_eq!(sizes, [1000, 1000, 500]);
    }

    #[test]
    fn large_outcomes_fill_a_message_to_about_a_mebibyte_and_a_larger_one_goes_alone() {
        let sized = |n: u32, bytes: usize| {
            super::complete(
                &n.to_string(),
                String::new(),
                serde_json::json!({ "blob": "x".repeat(bytes) }),
            )
        };
        let sent = packed(vec![
            sized(1, 400_000),
            sized(2, 400_000),
            sized(3, 400_000),
            sized(4, 2_000_000),
            sized(5, 10),
        ]);
        let shape: Vec<&str> = sent
            .iter()
            .map(|m| match m {
                connect_request::Kind::Outcomes(b) if b.outcomes.len() == 2 => "2",
                connect_request::Kind::Outcomes(_) => "other batch",
                connect_request::Kind::Complete(_) => "1",
                _ => "other",
            })
            .collect();
        // 1 and 2 together (800 kB); 3 alone, as 4 (2 MB) would overflow
        // the message; 4 alone; 5 alone, after it.
        assert_eq!(shape, ["2", "1", "1", "1"]);
        for m in &sent {
            if let connect_request::Kind::Outcomes(b) = m {
                assert!(prost::Message::encoded_len(b) <= limit::MAX_OUTCOME_BATCH_BYTES + 64);
            }
        }
    }
}

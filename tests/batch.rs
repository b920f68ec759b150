//! Batched session messages: several leased tasks in one push, several
//! outcomes in one worker message, each acknowledged on its own in one
//! answer, fenced per lease like the single forms, never more tasks out
//! than slots.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{get_task, register, Session, TestServer};
use leasehold::proto::{self, connect_request, connect_response::Kind as Resp, TaskStatus};

/// The registration of a session that reads `tasks` batches.
fn batched(worker_id: &str, task_types: &[&str], slots: i32) -> proto::RegisterWorker {
    proto::RegisterWorker {
        batched_pushes: true,
        ..register(worker_id, task_types, slots)
    }
}

fn lease(leased: &proto::LeasedTask) -> proto::Lease {
    leased.lease.clone().unwrap()
}

fn completion(lease: &proto::Lease) -> proto::Outcome {
    proto::Outcome {
        kind: Some(proto::outcome::Kind::Complete(proto::CompleteTaskRequest {
            task_id: lease.task_id.clone(),
            lease_token: lease.lease_token.clone(),
            result: Some(common::json(serde_json::json!({"ok": true}))),
        })),
    }
}

fn outcomes(outcomes: Vec<proto::Outcome>) -> connect_request::Kind {
    connect_request::Kind::Outcomes(proto::OutcomeBatch { outcomes })
}

/// Tasks pushed in batches fill the slots and never more; each batch of
/// completions frees their slots at once, and the next tasks follow.
#[tokio::test]
async fn batched_pushes_and_outcomes_never_exceed_the_slots() {
    let server = TestServer::start().await;
    let mut worker = Session::connect(&server.endpoint(), batched("w1", &["thumb"], 5)).await;
    let ids: HashSet<String> = server.create_many("thumb", 40).await.into_iter().collect();
    let mut held: HashMap<String, proto::Lease> = HashMap::new();
    let mut unanswered = 0usize;
    let mut done = HashSet::new();
    let mut batches = 0;
    while done.len() < ids.len() {
        match worker.next().await.unwrap() {
            Some(Resp::Tasks(batch)) => {
                batches += 1;
                for leased in &batch.tasks {
                    held.insert(
                        leased.lease.as_ref().unwrap().task_id.clone(),
                        lease(leased),
                    );
                }
                assert!(held.len() + unanswered <= 5, "more tasks out than slots");
            }
            Some(Resp::Task(leased)) => {
                held.insert(lease(&leased).task_id, lease(&leased));
                assert!(held.len() + unanswered <= 5, "more tasks out than slots");
            }
            Some(Resp::Acks(batch)) => {
                for ack in batch.acks {
                    assert_eq!(ack.status, proto::AckStatus::Ok as i32, "{ack:?}");
                    assert_eq!(ack.kind, proto::OutcomeKind::Complete as i32);
                    unanswered -= 1;
                    done.insert(ack.task_id);
                }
            }
            Some(Resp::Ack(ack)) => {
                assert_eq!(ack.status, proto::AckStatus::Ok as i32, "{ack:?}");
                unanswered -= 1;
                done.insert(ack.task_id);
            }
            other => panic!("unexpected {other:?}"),
        }
        // Complete everything held in one message once the session is
        // full, or when no more can come.
        if !held.is_empty()
            && (held.len() + unanswered == 5 || done.len() + held.len() + unanswered == ids.len())
        {
            let batch: Vec<proto::Outcome> = held.values().map(completion).collect();
            unanswered += batch.len();
            held.clear();
            worker.send(outcomes(batch)).await;
        }
    }
    assert_eq!(done, ids);
    assert!(batches > 0, "the tasks came in batches");
    server.stop().await;
}

/// Each outcome of a batch is fenced and answered on its own, in the order
/// sent: a completion, a failure, a release, a completion with a stale
/// token, one with a malformed id and one of an unknown task, in one
/// message, get OK, OK, OK, LEASE_LOST, INVALID and NOT_FOUND in one answer;
/// the batch repeated gets the same answers for what it had written.
#[tokio::test]
async fn each_outcome_of_a_batch_is_fenced_and_answered_on_its_own() {
    let server = TestServer::start().await;
    let mut worker = Session::connect(&server.endpoint(), batched("w1", &["mixed"], 3)).await;
    server.create_many("mixed", 3).await;
    let mut leases = Vec::new();
    while leases.len() < 3 {
        match worker.next().await.unwrap() {
            Some(Resp::Tasks(batch)) => leases.extend(batch.tasks.iter().map(lease)),
            Some(Resp::Task(leased)) => leases.push(lease(&leased)),
            other => panic!("unexpected {other:?}"),
        }
    }
    let (done, failed, released) = (&leases[0], &leases[1], &leases[2]);
    let unknown = uuid::Uuid::now_v7().to_string();
    let batch = vec![
        completion(done),
        proto::Outcome {
            kind: Some(proto::outcome::Kind::Fail(proto::FailTaskRequest {
                task_id: failed.task_id.clone(),
                lease_token: failed.lease_token.clone(),
                error: "corrupt file".into(),
                permanent: true,
                retry_after: None,
            })),
        },
        proto::Outcome {
            kind: Some(proto::outcome::Kind::Release(proto::ReleaseTaskRequest {
                task_id: released.task_id.clone(),
                lease_token: released.lease_token.clone(),
            })),
        },
        completion(&proto::Lease {
            lease_token: uuid::Uuid::new_v4().to_string(),
            ..done.clone()
        }),
        completion(&proto::Lease {
            task_id: "not-a-uuid".into(),
            ..done.clone()
        }),
        completion(&proto::Lease {
            task_id: unknown.clone(),
            ..done.clone()
        }),
    ];
    let statuses = |acks: &[proto::OutcomeAck]| -> Vec<(String, proto::AckStatus)> {
        acks.iter()
            .map(|a| (a.task_id.clone(), a.status()))
            .collect()
    };
    worker.send(outcomes(batch.clone())).await;
    let acks = loop {
        match worker.next().await.unwrap() {
            Some(Resp::Acks(batch)) => break batch.acks,
            // The released task comes back to this session's free slot.
            Some(Resp::Tasks(_)) | Some(Resp::Task(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    use proto::AckStatus::*;
    assert_eq!(
        statuses(&acks),
        [
            (done.task_id.clone(), Ok),
            (failed.task_id.clone(), Ok),
            (released.task_id.clone(), Ok),
            (done.task_id.clone(), LeaseLost),
            ("not-a-uuid".to_owned(), Invalid),
            (unknown.clone(), NotFound),
        ]
    );
    assert!(acks[4].message.starts_with("task_id:"), "{:?}", acks[4]);
    let mut tasks = server.tasks().await;
    assert_eq!(
        get_task(&mut tasks, &done.task_id).await.status(),
        TaskStatus::Completed
    );
    assert_eq!(
        get_task(&mut tasks, &failed.task_id).await.status(),
        TaskStatus::Failed
    );
    let back = get_task(&mut tasks, &released.task_id).await;
    assert_ne!(back.status(), TaskStatus::Completed);
    assert_eq!(
        back.attempts,
        if back.status() == TaskStatus::Pending {
            0
        } else {
            1
        }
    );

    // Repeated, the completion and the failure are recognised as applied;
    // the release, whose token is void now, is not.
    worker.send(outcomes(batch[..3].to_vec())).await;
    let again = loop {
        match worker
            .next_within(Duration::from_secs(10))
            .await
            .expect("an answer")
        {
            Resp::Acks(batch) => break batch.acks,
            Resp::Tasks(_) | Resp::Task(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(
        statuses(&again),
        [
            (done.task_id.clone(), Ok),
            (failed.task_id.clone(), Ok),
            (released.task_id.clone(), LeaseLost),
        ]
    );
    assert_eq!(again[0].task, acks[0].task, "the same task comes back");
    server.stop().await;
}

/// An empty batch, one past the limit, or an outcome that sets no kind
/// ends the stream with INVALID_ARGUMENT naming the field.
#[tokio::test]
async fn malformed_batches_end_the_stream_naming_the_field() {
    let server = TestServer::start().await;
    let cases = [
        (Vec::new(), "outcomes.outcomes:"),
        (
            vec![proto::Outcome { kind: None }; 1001],
            "outcomes.outcomes:",
        ),
        (
            vec![
                completion(&proto::Lease::default()),
                proto::Outcome { kind: None },
            ],
            "outcomes.outcomes[1].kind:",
        ),
    ];
    for (batch, field) in cases {
        let mut worker = Session::connect(&server.endpoint(), batched("w", &["none"], 1)).await;
        worker.send(outcomes(batch)).await;
        let status = loop {
            match worker.next().await {
                Err(status) => break status,
                Ok(Some(_)) => {}
                Ok(None) => panic!("the stream ended without an error"),
            }
        };
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().starts_with(field), "{}", status.message());
    }
    server.stop().await;
}

//! Group commit: writes that arrive together go to the database together.
//!
//! Callers submit one item and await its own result; a background loop takes
//! everything queued, runs one statement for the lot, and answers each
//! caller. While a batch is in flight the next one fills up, so the batch
//! size follows the load with no timer and no added latency when idle.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::store;

type Reply<O> = oneshot::Sender<store::Result<Vec<O>>>;

/// A queue of items written in batches by `run`.
pub(crate) struct Batcher<I, O> {
    tx: mpsc::UnboundedSender<(Vec<I>, Reply<O>)>,
}

impl<I, O> std::fmt::Debug for Batcher<I, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Batcher")
    }
}

impl<I, O> Clone for Batcher<I, O> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Starts the loop: about `max` items per batch (a single submission
    /// larger than that is one batch of its own) and `parallel` batches in
    /// flight. `run` must return one output per input, in input order.
    pub(crate) fn start<F, Fut>(max: usize, parallel: usize, run: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = store::Result<Vec<O>>> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Vec<I>, Reply<O>)>();
        let run = Arc::new(run);
        let permits = Arc::new(Semaphore::new(parallel));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let Some(first) = rx.recv().await else {
                    return;
                };
                let mut total = first.0.len();
                let mut submissions = vec![first];
                while total < max {
                    match rx.try_recv() {
                        Ok(submission) => {
                            total += submission.0.len();
                            submissions.push(submission);
                        }
                        Err(_) => break,
                    }
                }
                let run = run.clone();
                tokio::spawn(async move {
                    let mut inputs = Vec::with_capacity(total);
                    let mut replies = Vec::with_capacity(submissions.len());
                    for (items, reply) in submissions {
                        replies.push((items.len(), reply));
                        inputs.extend(items);
                    }
                    match run(inputs).await {
                        Ok(outputs) if outputs.len() == total => {
                            let mut outputs = outputs.into_iter();
                            for (n, reply) in replies {
                                let _ = reply.send(Ok(outputs.by_ref().take(n).collect()));
                            }
                        }
                        Ok(outputs) => {
                            let err = store::Error::Other(format!(
                                "batch returned {} results for {total} inputs",
                                outputs.len()
                            ));
                            for (_, reply) in replies {
                                let _ = reply.send(Err(err.clone()));
                            }
                        }
                        Err(err) => {
                            for (_, reply) in replies {
                                let _ = reply.send(Err(err.clone()));
                            }
                        }
                    }
                    drop(permit);
                });
            }
        });
        Self { tx }
    }

    /// Queues `items` and waits for their results, in order. They are
    /// written together, possibly with other submissions.
    pub(crate) async fn submit_many(&self, items: Vec<I>) -> store::Result<Vec<O>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((items, reply))
            .map_err(|_| store::Error::Unavailable("node is shutting down".into()))?;
        answer
            .await
            .map_err(|_| store::Error::Unavailable("node is shutting down".into()))?
    }

    /// Queues `item` and waits for its result.
    pub(crate) async fn submit(&self, item: I) -> store::Result<O> {
        self.submit_many(vec![item])
            .await?
            .pop()
            .ok_or_else(|| store::Error::Other("batch returned no result".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn items_submitted_together_share_a_batch_and_keep_their_answers() {
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let batcher = Batcher::start(100, 1, move |items: Vec<u32>| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(items.len());
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                Ok(items.into_iter().map(|i| i * 2).collect())
            }
        });
        let answers = futures_util::future::join_all((0..50).map(|i| {
            let batcher = batcher.clone();
            async move { batcher.submit(i).await.unwrap() }
        }))
        .await;
        assert_eq!(answers, (0..50).map(|i| i * 2).collect::<Vec<_>>());
        let sizes = sizes.lock().unwrap();
        assert!(sizes.len() < 50, "batched: {sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), 50);
    }

    #[tokio::test]
    async fn submissions_of_many_items_get_their_own_answers_in_order() {
        let batcher = Batcher::start(4, 1, |items: Vec<u32>| async move {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            Ok(items.into_iter().map(|i| i + 100).collect())
        });
        let (a, b, c) = tokio::join!(
            batcher.submit_many(vec![1, 2, 3]),
            batcher.submit_many(vec![4, 5, 6, 7, 8, 9]),
            batcher.submit_many(Vec::new()),
        );
        assert_eq!(a.unwrap(), vec![101, 102, 103]);
        assert_eq!(b.unwrap(), vec![104, 105, 106, 107, 108, 109]);
        assert_eq!(c.unwrap(), Vec::<u32>::new());
    }
}

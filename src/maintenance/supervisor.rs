//! The supervisor: starts every maintenance job, keeps it running through
//! failed and panicking passes, records its health, and stops it.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::Job;

/// How long a stopping node waits for its jobs' stop hooks (a pass in
/// flight is cancelled at once). Longer than a database call may wait for a
/// connection, so that the directory can still delete the node's row.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How a job is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Health {
    /// Its first pass has not finished yet.
    Starting,
    /// Its last pass succeeded.
    Healthy,
    /// Its last pass failed.
    Failing,
    /// The node stopped it.
    Stopped,
}

type Board = Arc<Mutex<BTreeMap<&'static str, Health>>>;

/// Runs the node's maintenance jobs until the node stops.
#[derive(Debug)]
pub(crate) struct Supervisor {
    stop: watch::Sender<bool>,
    jobs: JoinSet<()>,
    board: Board,
}

impl Supervisor {
    /// A supervisor with no job yet.
    pub(crate) fn new() -> Self {
        Self {
            stop: watch::channel(false).0,
            jobs: JoinSet::new(),
            board: Board::default(),
        }
    }

    /// Starts `job`: its first pass runs at once.
    pub(crate) fn spawn<J: Job>(&mut self, job: J) {
        self.board
            .lock()
            .expect("lock poisoned")
            .insert(J::NAME, Health::Starting);
        self.jobs
            .spawn(run(job, self.board.clone(), self.stop.subscribe()));
    }

    /// A handle that reads the jobs' health after the supervisor has moved
    /// on (to the health service).
    pub(crate) fn health_board(&self) -> HealthBoard {
        HealthBoard(self.board.clone())
    }

    /// Stops every job: a pass in flight is cancelled, then each job's stop
    /// hook runs. Waits for them, but not past [`STOP_TIMEOUT`].
    pub(crate) async fn stop(mut self) {
        let _ = self.stop.send(true);
        let all = async { while self.jobs.join_next().await.is_some() {} };
        if tokio::time::timeout(STOP_TIMEOUT, all).await.is_err() {
            tracing::warn!("maintenance jobs did not stop in time");
            self.jobs.abort_all();
        }
    }
}

/// A supervisor dropped without [`Supervisor::stop`] (its node dropped
/// without a shutdown) stops its jobs the same way, in the background: the
/// jobs see the stop channel close.
impl Drop for Supervisor {
    fn drop(&mut self) {
        self.jobs.detach_all();
    }
}

/// A read-only view of the jobs' health.
#[derive(Debug, Clone)]
pub(crate) struct HealthBoard(Board);

impl HealthBoard {
    /// Every job's health, by name.
    pub(crate) fn read(&self) -> Vec<(&'static str, Health)> {
        self.0
            .lock()
            .expect("lock poisoned")
            .iter()
            .map(|(name, health)| (*name, *health))
            .collect()
    }
}

async fn run<J: Job>(mut job: J, board: Board, mut stop: watch::Receiver<bool>) {
    let set = |health: Health| {
        board.lock().expect("lock poisoned").insert(J::NAME, health);
    };
    let mut failures: u32 = 0;
    loop {
        // A pass is cancelled when the node stops: its statements are each
        // atomic, and what a cut pass left undone the next node's pass does.
        let pass = AssertUnwindSafe(job.pass()).catch_unwind();
        let outcome = tokio::select! {
            outcome = pass => outcome,
            () = stopped(&mut stop) => break,
        };
        // A panic in a pass is a failed pass: the job goes on.
        let outcome = match outcome {
            Ok(outcome) => outcome.map_err(|err| err.to_string()),
            Err(panic) => Err(format!("pass panicked: {}", panic_message(panic.as_ref()))),
        };
        let delay = match outcome {
            Ok(delay) => {
                if failures > 0 {
                    tracing::info!(job = J::NAME, failures, "maintenance job recovered");
                }
                failures = 0;
                set(Health::Healthy);
                delay
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                // A long outage (the database away for an hour) is worth a
                // line now and then, not one per retry: the 1st, 2nd, 4th,
                // 8th... failure in a row.
                if failures.is_power_of_two() {
                    tracing::warn!(job = J::NAME, %error, failures, "maintenance pass failed");
                } else {
                    tracing::debug!(job = J::NAME, %error, failures, "maintenance pass failed");
                }
                set(Health::Failing);
                job.retry_after(failures)
            }
        };
        tokio::select! {
            () = job.wait(delay) => {}
            () = stopped(&mut stop) => break,
        }
    }
    job.stop().await;
    set(Health::Stopped);
}

/// Completes once the job must stop: the supervisor says so, or is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    if let Some(message) = panic.downcast_ref::<&str>() {
        message
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message
    } else {
        "(no message)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store;

    /// Fails its first two passes (the second by panicking), then succeeds;
    /// counts its stop hook.
    struct Flaky {
        passes: Arc<Mutex<u32>>,
        stopped: Arc<Mutex<bool>>,
    }

    impl Job for Flaky {
        const NAME: &'static str = "flaky";

        async fn pass(&mut self) -> Result<Duration, store::Error> {
            let n = {
                let mut passes = self.passes.lock().unwrap();
                *passes += 1;
                *passes
            };
            match n {
                1 => Err(store::Error::Unavailable("down".into())),
                2 => panic!("a bug"),
                _ => Ok(Duration::from_millis(5)),
            }
        }

        fn retry_after(&self, _failures: u32) -> Duration {
            Duration::from_millis(1)
        }

        async fn stop(&mut self) {
            *self.stopped.lock().unwrap() = true;
        }
    }

    #[tokio::test]
    async fn a_job_outlives_failed_and_panicking_passes_and_is_stopped() {
        let passes = Arc::new(Mutex::new(0));
        let stopped = Arc::new(Mutex::new(false));
        let mut supervisor = Supervisor::new();
        supervisor.spawn(Flaky {
            passes: passes.clone(),
            stopped: stopped.clone(),
        });
        let board = supervisor.health_board();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while *passes.lock().unwrap() < 4 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the job stopped running"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(board.read(), vec![("flaky", Health::Healthy)]);
        supervisor.stop().await;
        assert!(*stopped.lock().unwrap());
        assert_eq!(board.read(), vec![("flaky", Health::Stopped)]);
    }

    /// A job whose pass never ends; counts its stop hook.
    struct Stuck {
        stopped: Arc<Mutex<bool>>,
    }

    impl Job for Stuck {
        const NAME: &'static str = "stuck";

        async fn pass(&mut self) -> Result<Duration, store::Error> {
            std::future::pending().await
        }

        async fn stop(&mut self) {
            *self.stopped.lock().unwrap() = true;
        }
    }

    #[tokio::test]
    async fn a_pass_in_flight_is_cancelled_at_stop_and_the_stop_hook_runs() {
        let stopped = Arc::new(Mutex::new(false));
        let mut supervisor = Supervisor::new();
        supervisor.spawn(Stuck {
            stopped: stopped.clone(),
        });
        tokio::time::timeout(Duration::from_secs(5), supervisor.stop())
            .await
            .expect("stop waited for a pass that never ends");
        assert!(*stopped.lock().unwrap());
    }

    #[tokio::test]
    async fn a_dropped_supervisor_stops_its_jobs() {
        let stopped = Arc::new(Mutex::new(false));
        let mut supervisor = Supervisor::new();
        supervisor.spawn(Stuck {
            stopped: stopped.clone(),
        });
        let board = supervisor.health_board();
        drop(supervisor);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while board.read() != vec![("stuck", Health::Stopped)] {
            assert!(tokio::time::Instant::now() < deadline, "still running");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(*stopped.lock().unwrap());
    }

    /// A job with the trait's default back-off.
    struct Plain;

    impl Job for Plain {
        const NAME: &'static str = "plain";

        async fn pass(&mut self) -> Result<Duration, store::Error> {
            Ok(Duration::ZERO)
        }
    }

    #[test]
    fn the_default_back_off_doubles_up_to_a_minute() {
        assert_eq!(Plain.retry_after(1), Duration::from_secs(1));
        assert_eq!(Plain.retry_after(3), Duration::from_secs(4));
        assert_eq!(Plain.retry_after(7), Duration::from_secs(60));
        assert_eq!(Plain.retry_after(u32::MAX), Duration::from_secs(60));
    }
}

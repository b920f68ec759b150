//! Wires a node together: store, migrations, the LISTEN connection, event
//! hub, dispatcher, coordinator, maintenance jobs, health, reflection and
//! the two gRPC services, and runs it until shutdown. The only module that
//! knows how the others fit; none of them knows this one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::api::{AuthLayer, CallMetricsLayer, TaskApi, TokenApi, WorkerApi};
use crate::config::Config;
use crate::coordinator::Coordinator;
use crate::dispatch::{Dispatcher, Settings};
use crate::events::Hub;
use crate::maintenance::{
    Directory, Health, History, NodeState, Reclaimer, Supervisor, Vacuumer, DAYS_AHEAD,
};
use crate::metrics::{Metrics, Refresh};
use crate::model::Backoff;
use crate::store::{self, Listener, Notice, Store};
use crate::wire::proto::task_service_server::TaskServiceServer;
use crate::wire::proto::token_service_server::TokenServiceServer;
use crate::wire::proto::worker_service_server::WorkerServiceServer;

/// Why a node could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The database could not be prepared.
    #[error("{0}")]
    Database(String),
    /// Binding or serving failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The listener failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The reflection service could not be built.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// How long a stopping node waits for in-flight calls once its sessions
/// are drained.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the health service re-checks the database.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);

/// Fully qualified service names, as health checks name them.
const SERVICE_NAMES: [&str; 4] = [
    "",
    "leasehold.v1.TaskService",
    "leasehold.v1.WorkerService",
    "leasehold.v1.TokenService",
];

/// The prefix of a maintenance job's name in health checks
/// (`leasehold.maintenance.reclaimer`).
const JOB_SERVICE_PREFIX: &str = "leasehold.maintenance.";

/// A running node.
#[derive(Debug)]
pub struct Running {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    handle: JoinHandle<Result<(), Error>>,
    dispatcher: Dispatcher,
    maintenance: Supervisor,
    drain_grace: Duration,
}

impl Running {
    /// The address the node listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address of the node's metrics endpoint, when it has one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// This node's id, as sessions and ListWorkers show it.
    pub fn node_id(&self) -> uuid::Uuid {
        self.dispatcher.node_id()
    }

    /// Stops gracefully: drains the worker sessions (they are told to
    /// finish or release their tasks and may do so for the drain grace
    /// period), then stops accepting, lets in-flight calls finish (long polls
    /// and watch streams end), and waits until the node has stopped.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        self.dispatcher.drain(self.drain_grace).await;
        let _ = self.shutdown.send(true);
        self.maintenance.stop().await;
        // A client that stopped reading (a stalled watcher) would hold its
        // stream, and with it the graceful stop, forever: cut it short.
        match tokio::time::timeout(STOP_TIMEOUT, &mut self.handle).await {
            Ok(result) => result.unwrap_or_else(|err| Err(Error::Io(std::io::Error::other(err)))),
            Err(_) => {
                tracing::warn!("in-flight calls did not finish in time: closing them");
                self.handle.abort();
                Ok(())
            }
        }
    }

    /// Runs until `signal` completes, then shuts down gracefully; returns
    /// early if the server fails.
    pub async fn run_until(
        mut self,
        signal: impl std::future::Future<Output = ()>,
    ) -> Result<(), Error> {
        tokio::select! {
            _ = signal => self.shutdown().await,
            result = &mut self.handle => {
                let _ = self.shutdown.send(true);
                self.maintenance.stop().await;
                result.unwrap_or_else(|err| Err(Error::Io(std::io::Error::other(err))))
            }
        }
    }
}

impl From<store::Error> for Error {
    fn from(err: store::Error) -> Self {
        Error::Database(err.to_string())
    }
}

/// Prepares the database (creating it if missing, then migrating).
pub(crate) async fn prepare_database(config: &Config) -> Result<Store, Error> {
    config.validate().map_err(Error::Config)?;
    let store = Store::new(
        &config.database_url,
        config.db_pool_size,
        config.db_timeout,
        config.db_statement_timeout,
    )?;
    store.database_create_if_missing().await?;
    store.migrate().await?;
    // The history's days ahead exist before the first task can finish
    // (nothing is dropped here; that is the running node's job).
    store.history_upkeep(DAYS_AHEAD, |_| None, true).await?;
    Ok(store)
}

/// Creates the database if it is missing and applies the migrations it
/// lacks (`leasehold migrate`). Several nodes may do this at once.
pub async fn migrate(config: &Config) -> Result<(), Error> {
    prepare_database(config).await.map(drop)
}

/// A store over `database_url`, created and migrated if need be, for the
/// token commands that work on the database directly.
async fn token_store(database_url: &str) -> Result<Store, String> {
    let config = Config::with_database_url(database_url);
    prepare_database(&config)
        .await
        .map_err(|err| err.to_string())
}

/// `leasehold token create --database-url`: a token made with no server,
/// such as the first admin token of a fresh install.
pub(crate) async fn token_create_direct(
    database_url: &str,
    request: &crate::wire::proto::CreateTokenRequest,
) -> Result<crate::wire::proto::CreateTokenResponse, String> {
    let new = crate::wire::request::token_create(request, std::time::SystemTime::now())
        .map_err(|err| err.to_string())?;
    let store = token_store(database_url).await?;
    let (token, secret) = crate::auth::create(&store, &new)
        .await
        .map_err(|err| err.to_string())?;
    Ok(crate::wire::proto::CreateTokenResponse {
        token: Some(crate::wire::convert::token_to_proto(&token)),
        secret,
    })
}

/// `leasehold token list --database-url`.
pub(crate) async fn token_list_direct(
    database_url: &str,
) -> Result<Vec<crate::wire::proto::Token>, String> {
    let store = token_store(database_url).await?;
    let tokens = store.token_list().await.map_err(|err| err.to_string())?;
    Ok(tokens
        .iter()
        .map(crate::wire::convert::token_to_proto)
        .collect())
}

/// `leasehold token revoke --database-url`.
pub(crate) async fn token_revoke_direct(
    database_url: &str,
    id: &str,
) -> Result<crate::wire::proto::Token, String> {
    let id = crate::wire::request::token_id(id).map_err(|err| err.to_string())?;
    let store = token_store(database_url).await?;
    match store
        .token_revoke(id)
        .await
        .map_err(|err| err.to_string())?
    {
        Some(token) => Ok(crate::wire::convert::token_to_proto(&token)),
        None => Err(format!("token {id} not found")),
    }
}

/// Starts a node on `listener` (bound by the caller, so tests can use port
/// 0) and returns once it accepts calls.
pub async fn start(config: Config, listener: tokio::net::TcpListener) -> Result<Running, Error> {
    config.check_exposure().map_err(Error::Config)?;
    let store = prepare_database(&config).await?;
    let addr = listener.local_addr()?;
    let node_id = uuid::Uuid::now_v7();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let tls = config
        .tls_files()
        .map(crate::tls::Acceptor::load)
        .transpose()
        .map_err(Error::Config)?
        .map(Arc::new);
    let metrics = Arc::new(Metrics::new());
    // Bound before anything starts, so that a taken port fails the start.
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await?),
        None => None,
    };
    let metrics_addr = metrics_listener
        .as_ref()
        .map(|listener| listener.local_addr())
        .transpose()?;

    let events = Hub::start(store.clone(), shutdown_rx.clone());
    let dispatcher = Dispatcher::start(
        store.clone(),
        Settings {
            node_id,
            poll_interval: config.poll_interval,
            backoff: Backoff {
                base: config.retry_backoff_base,
                max: config.retry_backoff_max,
            },
            metrics: metrics.clone(),
        },
        events.clone(),
        shutdown_rx.clone(),
    );
    let (notices, listening) = store.listen(shutdown_rx.clone());
    tokio::spawn(route(notices, dispatcher.clone(), events.clone()));
    if tokio::time::timeout(config.db_timeout, listening)
        .await
        .is_err()
    {
        tracing::warn!("not yet listening for notifications; starting anyway");
    }
    let coordinator = Coordinator::new(store.clone(), dispatcher.clone(), events, metrics.clone());
    if let Some(listener) = metrics_listener {
        let refresh: Refresh = {
            let (store, dispatcher) = (store.clone(), dispatcher.clone());
            Arc::new(move |metrics: &Metrics| {
                let (sessions, free) = dispatcher.session_slots();
                metrics.sessions_now(sessions, free);
                let (in_use, idle, waiting) = store.pool_usage();
                metrics.pool_now(in_use, idle, waiting);
            })
        };
        tokio::spawn(crate::metrics::serve(
            listener,
            metrics.clone(),
            refresh,
            shutdown_rx.clone(),
        ));
        tokio::spawn(queue_sample_loop(
            store.clone(),
            metrics.clone(),
            config.metrics_queue_interval,
            shutdown_rx.clone(),
        ));
    }

    let (reclaimed_tx, mut reclaimed_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut maintenance = Supervisor::new();
    maintenance.spawn(Reclaimer::new(
        store.clone(),
        config.reclaim_interval,
        reclaimed_tx,
    ));
    if config.vacuum_threshold > 0 {
        maintenance.spawn(Vacuumer::new(store.clone(), config.vacuum_threshold));
    }
    {
        let config = config.clone();
        maintenance.spawn(History::new(store.clone(), move |status| {
            config.retention(status)
        }));
    }
    maintenance.spawn(Directory::new(
        store.clone(),
        node_id,
        addr.to_string(),
        {
            let dispatcher = dispatcher.clone();
            move || NodeState {
                draining: dispatcher.is_draining(),
                sessions: dispatcher.directory_entries(),
            }
        },
        dispatcher.sessions_changed(),
    ));
    {
        let coordinator = coordinator.clone();
        tokio::spawn(async move {
            while let Some(tasks) = reclaimed_rx.recv().await {
                coordinator.on_reclaimed(&tasks).await;
            }
        });
    }
    let authenticator = Arc::new(crate::auth::Authenticator::new(store.clone()));
    let auth = (config.auth == crate::config::Auth::Required).then(|| authenticator.clone());
    // A message must fit the largest payload plus the rest of the request.
    let max_message = (config.max_payload_bytes + 64 * 1024).max(4 * 1024 * 1024);
    let tasks = TaskServiceServer::new(TaskApi::new(
        coordinator.clone(),
        config.max_payload_bytes,
        shutdown_rx.clone(),
        auth.clone(),
    ))
    .max_decoding_message_size(max_message);
    let workers = WorkerServiceServer::new(WorkerApi::new(
        coordinator,
        config.lease_duration,
        config.max_payload_bytes,
        auth.clone(),
    ))
    .max_decoding_message_size(max_message);
    let tokens = TokenServiceServer::new(TokenApi::new(authenticator));

    let (health, health_service) = tonic_health::server::health_reporter();
    tokio::spawn(health_loop(
        store,
        maintenance.health_board(),
        health,
        shutdown_rx.clone(),
    ));

    // Older grpcurl and Python's grpcio-reflection speak only v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::wire::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let (reflection_v1, reflection_v1alpha) = if config.reflection {
        (
            Some(reflection().build_v1()?),
            Some(reflection().build_v1alpha()?),
        )
    } else {
        (None, None)
    };

    let mut stop = shutdown_rx.clone();
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let router = tonic::transport::Server::builder()
        // Dead peers are noticed even on idle connections.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // Refused calls are counted too: metrics wrap authentication.
        .layer(CallMetricsLayer::new(metrics))
        .layer(AuthLayer::new(auth))
        .add_service(health_service)
        .add_optional_service(reflection_v1)
        .add_optional_service(reflection_v1alpha)
        .add_service(tasks)
        .add_service(workers)
        .add_service(tokens);
    let secure = tls.is_some();
    let handle = match tls {
        None => {
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            tokio::spawn(async move {
                router
                    .serve_with_incoming_shutdown(incoming, stopped)
                    .await?;
                tracing::info!("server stopped");
                Ok(())
            })
        }
        Some(acceptor) => {
            tokio::spawn(crate::tls::reload_on_hangup(
                acceptor.clone(),
                shutdown_rx.clone(),
            )?);
            let incoming = crate::tls::incoming(listener, acceptor, shutdown_rx);
            tokio::spawn(async move {
                router
                    .serve_with_incoming_shutdown(incoming, stopped)
                    .await?;
                tracing::info!("server stopped");
                Ok(())
            })
        }
    };
    tracing::info!(%addr, tls = secure, node_id = %dispatcher.node_id(), "listening");
    Ok(Running {
        addr,
        metrics_addr,
        shutdown: shutdown_tx,
        handle,
        dispatcher,
        maintenance,
        drain_grace: config.drain_grace,
    })
}

/// Routes what the node's LISTEN connection hears: pending tasks wake the
/// dispatcher (a burst of notifications is one wake-up), revoked leases go
/// to the sessions holding them, events to the local watchers.
///
/// Whenever the connection is listening again after a break, whatever it
/// missed is made up for at once: the dispatcher claims again (tasks may
/// have arrived) and the leases the sessions hold are checked against the
/// database (revokes may have been sent).
async fn route(mut notices: Listener, dispatcher: Dispatcher, events: Hub) {
    while let Some(burst) = notices.next_burst().await {
        let mut woken = false;
        for notice in burst {
            match notice {
                Notice::Listening => {
                    woken = true;
                    let dispatcher = dispatcher.clone();
                    tokio::spawn(async move {
                        match dispatcher.leases_recheck().await {
                            Ok(0) => {}
                            Ok(n) => tracing::info!(
                                leases = n,
                                "leases revoked while not listening: sessions told"
                            ),
                            Err(err) => tracing::warn!(
                                error = %err,
                                "cannot re-check the sessions' leases after listening again"
                            ),
                        }
                    });
                }
                Notice::TasksPending => woken = true,
                Notice::Revoked(payload) => dispatcher.on_revoke(&payload),
                Notice::Events(payload) => events.receive(&payload),
                Notice::WatcherSeen => events.remote_watcher_seen(),
            }
        }
        if woken {
            dispatcher.wake();
        }
    }
}

/// Samples the queue for the metrics every `interval`: one aggregate over
/// the live table, whatever the number of scrapes.
async fn queue_sample_loop(
    store: Store,
    metrics: Arc<Metrics>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        match store.task_queue_sample().await {
            Ok(rows) => {
                let depths: Vec<(String, String, i64)> = rows
                    .iter()
                    .map(|(task_type, status, n, _)| {
                        (task_type.clone(), status.as_str().to_owned(), *n)
                    })
                    .collect();
                let oldest: Vec<(String, f64)> = rows
                    .iter()
                    .filter_map(|(task_type, _, _, oldest)| {
                        Some((task_type.clone(), oldest.as_ref()?.as_secs_f64()))
                    })
                    .collect();
                metrics.queue_sampled(&depths, &oldest);
            }
            // The gauges keep the last sample; health reports the database.
            Err(err) => tracing::debug!(error = %err, "cannot sample the queue for metrics"),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// Reports SERVING only while the database answers, and each maintenance
/// job as `leasehold.maintenance.<job>`: SERVING while its last pass
/// succeeded, NOT_SERVING while it fails.
async fn health_loop(
    store: Store,
    jobs: crate::maintenance::HealthBoard,
    health: tonic_health::server::HealthReporter,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last = None;
    loop {
        let status = match tokio::time::timeout(HEALTH_INTERVAL, store.ping()).await {
            Ok(Ok(())) => ServingStatus::Serving,
            _ => ServingStatus::NotServing,
        };
        if last != Some(status) {
            if status == ServingStatus::Serving {
                tracing::info!("database reachable: serving");
            } else {
                tracing::warn!("database unreachable: not serving");
            }
            for name in SERVICE_NAMES {
                health.set_service_status(name, status).await;
            }
            last = Some(status);
        }
        for (job, state) in jobs.read() {
            let status = match state {
                Health::Starting => ServingStatus::Unknown,
                Health::Healthy => ServingStatus::Serving,
                Health::Failing | Health::Stopped => ServingStatus::NotServing,
            };
            health
                .set_service_status(format!("{JOB_SERVICE_PREFIX}{job}"), status)
                .await;
        }
        let stopping = tokio::select! {
            _ = tokio::time::sleep(HEALTH_INTERVAL) => false,
            _ = shutdown.wait_for(|s| *s) => true,
        };
        if stopping {
            for name in SERVICE_NAMES {
                health
                    .set_service_status(name, ServingStatus::NotServing)
                    .await;
            }
            for (job, _) in jobs.read() {
                health
                    .set_service_status(
                        format!("{JOB_SERVICE_PREFIX}{job}"),
                        ServingStatus::NotServing,
                    )
                    .await;
            }
            return;
        }
    }
}

//! One configuration tree for the server: flags with environment
//! equivalents, their defaults, and the checks run once at start-up.
//!
//! Nothing here touches the network or the database.

use std::net::SocketAddr;
use std::time::Duration;

use crate::model::Status;
use crate::wire::limit::{MAX_LEASE, MIN_LEASE};

/// Whether calls need a bearer token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Auth {
    /// Every call but health and reflection needs a valid token of a role
    /// that allows it.
    Required,
    /// No token is checked.
    Off,
}

/// Server configuration. Every field is a command-line flag with an
/// environment variable of the same meaning, listed by `leasehold serve --help`.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// A TOML file of settings, keyed by flag name (`db-pool-size = 32`,
    /// `tls-cert = "/etc/leasehold/server.pem"`); environment variables and
    /// flags override it. An unknown key or a bad value stops the start.
    #[arg(long = "config", env = "LEASEHOLD_CONFIG", value_name = "FILE")]
    pub config_file: Option<std::path::PathBuf>,

    /// Print the effective configuration (file, environment and flags
    /// merged) as TOML, and exit.
    #[arg(long)]
    pub print_config: bool,

    /// Address the gRPC server listens on.
    #[arg(long, env = "LEASEHOLD_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// `required`: every call but health and reflection needs a bearer
    /// token (`authorization: Bearer <token>`) whose role allows it; `off`:
    /// none is checked.
    #[arg(long, env = "LEASEHOLD_AUTH", value_enum, default_value_t = Auth::Off)]
    pub auth: Auth,

    /// Allows listening on a non-loopback address without both TLS and
    /// `--auth required` (the node refuses to start so otherwise).
    #[arg(long, env = "LEASEHOLD_INSECURE")]
    pub insecure: bool,

    /// Serves gRPC server reflection (what `grpcurl` lists and describes
    /// with); `false` turns it off.
    #[arg(long, env = "LEASEHOLD_REFLECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub reflection: bool,

    /// PEM certificate chain to serve gRPC over TLS with (with `--tls-key`);
    /// plaintext when not given. Re-read, with the key and the client CA,
    /// on SIGHUP: new connections use the new files, open ones stay.
    #[arg(long, env = "LEASEHOLD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "LEASEHOLD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,

    /// PEM certificates of the CAs whose client certificates are accepted:
    /// mutual TLS, every client must present one (with `--tls-cert`).
    #[arg(long, env = "LEASEHOLD_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<std::path::PathBuf>,

    /// Address of the Prometheus metrics endpoint (HTTP `GET /metrics`);
    /// no endpoint when not given.
    #[arg(long, env = "LEASEHOLD_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// How often the node samples the queue (live tasks per type and
    /// status, oldest due task) for its metrics: one SQL aggregate that
    /// every scrape shares. Only with `--metrics-listen`.
    #[arg(long, env = "LEASEHOLD_METRICS_QUEUE_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub metrics_queue_interval: Duration,

    /// Postgres connection URL. The database is created if it does not exist
    /// (when the role may create databases).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/leasehold"
    )]
    pub database_url: String,

    /// Maximum number of pooled database connections.
    #[arg(long, env = "LEASEHOLD_DB_POOL_SIZE", default_value_t = 16)]
    pub db_pool_size: usize,

    /// How long a request waits for a database connection (and for a new
    /// connection to open) before it fails with UNAVAILABLE.
    #[arg(long, env = "LEASEHOLD_DB_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub db_timeout: Duration,

    /// Longest a single database statement of this node may run (Postgres'
    /// `statement_timeout` on every connection but the migrations'): a
    /// statement stuck behind a lock fails and is retried or answered
    /// UNAVAILABLE instead of holding a request, a claim or a drain. `0`
    /// sets no limit.
    #[arg(long, env = "LEASEHOLD_DB_STATEMENT_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub db_statement_timeout: Duration,

    /// Lease length when a request does not give one.
    #[arg(long, env = "LEASEHOLD_LEASE_DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,

    /// First retry delay after a failed attempt; doubles with each attempt.
    #[arg(long, env = "LEASEHOLD_RETRY_BACKOFF_BASE", default_value = "1s", value_parser = humantime::parse_duration)]
    pub retry_backoff_base: Duration,

    /// Longest retry delay after a failed attempt.
    #[arg(long, env = "LEASEHOLD_RETRY_BACKOFF_MAX", default_value = "10m", value_parser = humantime::parse_duration)]
    pub retry_backoff_max: Duration,

    /// Largest accepted `params` or `result`, in encoded bytes.
    #[arg(long, env = "LEASEHOLD_MAX_PAYLOAD_BYTES", default_value_t = 1024 * 1024)]
    pub max_payload_bytes: usize,

    /// Interval of the reclaimer's safety sweep for expired leases (the
    /// reclaimer also wakes exactly at the earliest expiry it knows of).
    #[arg(long, env = "LEASEHOLD_RECLAIM_INTERVAL", default_value = "250ms", value_parser = humantime::parse_duration)]
    pub reclaim_interval: Duration,

    /// Interval at which waiting workers re-check for due tasks even without
    /// a notification (a safety net; notifications wake them at once).
    #[arg(long, env = "LEASEHOLD_POLL_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,

    /// On SIGTERM, how long connected workers may still finish or release
    /// their tasks before their sessions are closed.
    #[arg(long, env = "LEASEHOLD_DRAIN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_grace: Duration,

    /// Dead row versions in the task table at which a node vacuums it
    /// (checked every 5 s; 0 leaves it to autovacuum alone).
    #[arg(long, env = "LEASEHOLD_VACUUM_THRESHOLD", default_value_t = 20_000)]
    pub vacuum_threshold: u64,

    /// How long finished tasks are kept (completed, failed and cancelled
    /// alike, unless overridden below); `0` keeps them forever. The history
    /// is dropped by whole days: a task is kept at least this long after it
    /// finished, and at most a day longer.
    #[arg(long, env = "LEASEHOLD_RETAIN_FINISHED", default_value = "14d", value_parser = humantime::parse_duration)]
    pub retain_finished: Duration,

    /// How long completed tasks are kept, instead of `--retain-finished`;
    /// `0` keeps them forever.
    #[arg(long, env = "LEASEHOLD_RETAIN_COMPLETED", value_parser = humantime::parse_duration)]
    pub retain_completed: Option<Duration>,

    /// How long failed tasks are kept, instead of `--retain-finished`; `0`
    /// keeps them forever.
    #[arg(long, env = "LEASEHOLD_RETAIN_FAILED", value_parser = humantime::parse_duration)]
    pub retain_failed: Option<Duration>,

    /// How long cancelled tasks are kept, instead of `--retain-finished`;
    /// `0` keeps them forever.
    #[arg(long, env = "LEASEHOLD_RETAIN_CANCELLED", value_parser = humantime::parse_duration)]
    pub retain_cancelled: Option<Duration>,
}

impl Config {
    /// A configuration with every default, for the given database.
    pub fn with_database_url(database_url: impl Into<String>) -> Self {
        Self {
            config_file: None,
            print_config: false,
            listen: "127.0.0.1:50051".parse().expect("valid literal address"),
            auth: Auth::Off,
            insecure: false,
            reflection: true,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            metrics_listen: None,
            metrics_queue_interval: Duration::from_secs(5),
            database_url: database_url.into(),
            db_pool_size: 16,
            db_timeout: Duration::from_secs(5),
            db_statement_timeout: Duration::from_secs(30),
            lease_duration: Duration::from_secs(30),
            retry_backoff_base: Duration::from_secs(1),
            retry_backoff_max: Duration::from_secs(600),
            max_payload_bytes: 1024 * 1024,
            reclaim_interval: Duration::from_millis(250),
            poll_interval: Duration::from_secs(2),
            drain_grace: Duration::from_secs(30),
            vacuum_threshold: 20_000,
            retain_finished: Duration::from_secs(14 * 24 * 3600),
            retain_completed: None,
            retain_failed: None,
            retain_cancelled: None,
        }
    }

    /// How long finished tasks of `status` are kept; `None`: forever.
    pub(crate) fn retention(&self, status: Status) -> Option<Duration> {
        let keep = match status {
            Status::Completed => self.retain_completed,
            Status::Failed => self.retain_failed,
            Status::Cancelled => self.retain_cancelled,
            Status::Pending | Status::Processing => return None,
        }
        .unwrap_or(self.retain_finished);
        (!keep.is_zero()).then_some(keep)
    }

    /// The TLS files, when the node serves TLS.
    pub(crate) fn tls_files(&self) -> Option<crate::tls::Files> {
        Some(crate::tls::Files {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
        })
    }

    /// Refuses to serve a non-loopback address without both TLS and
    /// `--auth required`, unless `--insecure`; checked by a node before it
    /// serves (not by `migrate`, which serves nothing).
    pub fn check_exposure(&self) -> Result<(), String> {
        let secure = self.tls_cert.is_some() && self.auth == Auth::Required;
        if self.listen.ip().is_loopback() || secure || self.insecure {
            return Ok(());
        }
        Err(format!(
            "--listen {}: refusing to serve a non-loopback address without TLS \
             (--tls-cert, --tls-key) and --auth required; give --insecure to do it anyway",
            self.listen
        ))
    }

    /// Checks the values that flags alone cannot; called once at start-up.
    pub fn validate(&self) -> Result<(), String> {
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err("--tls-cert and --tls-key go together".into());
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            return Err("--tls-client-ca needs --tls-cert and --tls-key".into());
        }
        if self.db_pool_size == 0 {
            return Err("--db-pool-size must be at least 1".into());
        }
        if self.db_timeout.is_zero() {
            return Err("--db-timeout must be positive".into());
        }
        if !self.db_statement_timeout.is_zero()
            && self.db_statement_timeout < Duration::from_millis(1)
        {
            return Err("--db-statement-timeout must be 0 (no limit) or at least 1ms".into());
        }
        if !(MIN_LEASE..=MAX_LEASE).contains(&self.lease_duration) {
            return Err("--lease-duration must be between 1s and 1h".into());
        }
        if self.retry_backoff_base.is_zero() || self.retry_backoff_max < self.retry_backoff_base {
            return Err(
                "--retry-backoff-base must be positive and at most --retry-backoff-max".into(),
            );
        }
        if self.max_payload_bytes == 0 || self.max_payload_bytes > 64 * 1024 * 1024 {
            return Err("--max-payload-bytes must be between 1 and 67108864".into());
        }
        if self.metrics_queue_interval < Duration::from_millis(100) {
            return Err("--metrics-queue-interval must be at least 100ms".into());
        }
        if self.reclaim_interval.is_zero() || self.poll_interval.is_zero() {
            return Err("--reclaim-interval and --poll-interval must be positive".into());
        }
        Ok(())
    }
}

/// The flags that are no settings of a config file.
const NOT_SETTINGS: [&str; 2] = ["config", "print-config"];

/// Every setting a config file may hold: the long flags of [`Config`] with
/// their environment variables.
fn settings() -> Vec<clap::Arg> {
    let command = <Config as clap::Args>::augment_args(clap::Command::new("leasehold"));
    command
        .get_arguments()
        .filter(|arg| {
            arg.get_long()
                .is_some_and(|long| !NOT_SETTINGS.contains(&long))
                && arg.get_env().is_some()
        })
        .cloned()
        .collect()
}

/// The config file a command line names (`--config FILE`, `--config=FILE`),
/// or else `LEASEHOLD_CONFIG`.
pub fn file_named(args: &[std::ffi::OsString]) -> Option<std::path::PathBuf> {
    let mut args = args.iter().skip(1);
    while let Some(arg) = args.next() {
        let arg = arg.to_string_lossy();
        if arg == "--" {
            break;
        }
        if arg == "--config" {
            return args.next().map(Into::into);
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            return Some(path.into());
        }
    }
    std::env::var_os("LEASEHOLD_CONFIG").map(Into::into)
}

/// Reads the config file at `path` into the environment variables its
/// settings stand for: the caller sets those not set already, so that
/// flags override the environment, which overrides the file. Every key is
/// checked against the flags and every value with its flag's own parser;
/// the first bad one fails, named.
pub fn file_environment(path: &std::path::Path) -> Result<Vec<(String, String)>, String> {
    let file = path.display();
    let text = std::fs::read_to_string(path).map_err(|err| format!("--config {file}: {err}"))?;
    let table: toml::Table = text
        .parse()
        .map_err(|err| format!("--config {file}: not valid TOML: {err}"))?;
    let settings = settings();
    let mut out = Vec::with_capacity(table.len());
    for (key, value) in &table {
        let Some(arg) = settings.iter().find(|arg| {
            arg.get_long()
                .is_some_and(|long| long == key.replace('_', "-"))
        }) else {
            return Err(format!(
                "{file}: unknown setting `{key}` (the settings are the flags of \
                 `leasehold serve --help`, named without their `--`: `db-pool-size = 16`)"
            ));
        };
        let text = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(n) => n.to_string(),
            toml::Value::Float(x) => x.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            _ => {
                return Err(format!(
                    "{file}: {key}: expected a string, a number or a boolean"
                ))
            }
        };
        if arg.get_action().takes_values() {
            // The flag alone, with its own parser (its ties to other flags
            // and its environment variable left out).
            let trial = clap::Command::new("leasehold").no_binary_name(true).arg(
                clap::Arg::new("value")
                    .long("value")
                    .value_parser(arg.get_value_parser().clone())
                    .action(clap::ArgAction::Set),
            );
            trial
                .try_get_matches_from(["--value", text.as_str()])
                .map_err(|err| {
                    // clap's words, less the stand-in flag's name.
                    let why = err
                        .to_string()
                        .replace(" for '--value <value>'", "")
                        .lines()
                        .map(str::trim)
                        .filter(|line| !line.is_empty() && !line.starts_with("For more"))
                        .collect::<Vec<_>>()
                        .join(" ");
                    let why = why.trim_start_matches("error: ").to_owned();
                    format!("{file}: {key} = {value}: {why}")
                })?;
        } else if !matches!(value, toml::Value::Boolean(_)) {
            return Err(format!("{file}: {key} = {value}: expected true or false"));
        }
        let env = arg
            .get_env()
            .expect("settings have an environment variable")
            .to_string_lossy()
            .into_owned();
        out.push((env, text));
    }
    Ok(out)
}

/// The effective configuration of `matches` (a command's flattened
/// [`Config`]) as a TOML config file: every setting, where it came from in
/// a comment, and those unset commented out.
pub fn render(matches: &clap::ArgMatches) -> String {
    let mut out = String::from("# leasehold configuration (file, environment and flags merged)\n");
    for arg in settings() {
        let id = arg.get_id().as_str();
        let long = arg.get_long().unwrap_or(id);
        let values: Vec<String> = matches
            .get_raw(id)
            .map(|raw| raw.map(|v| v.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let source = match matches.value_source(id) {
            Some(clap::parser::ValueSource::CommandLine) => "flag",
            Some(clap::parser::ValueSource::EnvVariable) => "environment or file",
            Some(clap::parser::ValueSource::DefaultValue) => "default",
            _ => "unset",
        };
        // A password in the database URL is not printed.
        let values: Vec<String> = if long == "database-url" {
            values.into_iter().map(|url| mask_password(&url)).collect()
        } else {
            values
        };
        match values.as_slice() {
            [] => out.push_str(&format!("# {long} =  (unset)\n")),
            [value] => {
                let literal = if value.parse::<i64>().is_ok() || value == "true" || value == "false"
                {
                    value.clone()
                } else {
                    toml::Value::String(value.clone()).to_string()
                };
                out.push_str(&format!("{long} = {literal}  # {source}\n"));
            }
            many => {
                let list: Vec<String> = many
                    .iter()
                    .map(|v| toml::Value::String(v.clone()).to_string())
                    .collect();
                out.push_str(&format!("{long} = [{}]  # {source}\n", list.join(", ")));
            }
        }
    }
    out
}

/// `postgres://user:secret@host/db` as `postgres://user:***@host/db`.
fn mask_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_database_urls_hide_their_password() {
        assert_eq!(
            mask_password("postgres://leasehold:s3cret@db:5432/leasehold"),
            "postgres://leasehold:***@db:5432/leasehold"
        );
        assert_eq!(
            mask_password("postgres://postgres@127.0.0.1/x"),
            "postgres://postgres@127.0.0.1/x"
        );
    }

    #[test]
    fn a_config_file_names_its_unknown_keys_and_bad_values() {
        let dir = std::env::temp_dir().join(format!("leasehold-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |text: &str| {
            let path = dir.join("leasehold.toml");
            std::fs::write(&path, text).unwrap();
            path
        };
        let good = file_environment(&write(
            "listen = \"127.0.0.1:6000\"\ndb-pool-size = 4\nreclaim_interval = \"100ms\"\nauth = \"required\"\n",
        ))
        .unwrap();
        assert_eq!(
            good,
            vec![
                ("LEASEHOLD_AUTH".to_owned(), "required".to_owned()),
                ("LEASEHOLD_DB_POOL_SIZE".to_owned(), "4".to_owned()),
                ("LEASEHOLD_LISTEN".to_owned(), "127.0.0.1:6000".to_owned()),
                ("LEASEHOLD_RECLAIM_INTERVAL".to_owned(), "100ms".to_owned()),
            ]
        );
        let unknown = file_environment(&write("db-pool = 4\n")).unwrap_err();
        assert!(unknown.contains("unknown setting `db-pool`"), "{unknown}");
        let bad = file_environment(&write("db-pool-size = \"many\"\n")).unwrap_err();
        assert!(bad.contains("db-pool-size"), "{bad}");
        let bad = file_environment(&write("auth = \"maybe\"\n")).unwrap_err();
        assert!(bad.contains("auth") && bad.contains("maybe"), "{bad}");
        let nested = file_environment(&write("[db]\npool = 4\n")).unwrap_err();
        assert!(nested.contains("db"), "{nested}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn defaults_are_valid() {
        Config::with_database_url("postgres://x@y/z")
            .validate()
            .unwrap();
    }

    #[test]
    fn retention_defaults_to_the_finished_one_and_zero_keeps_forever() {
        let mut config = Config::with_database_url("postgres://x@y/z");
        let days = |n: u64| Duration::from_secs(n * 24 * 3600);
        assert_eq!(config.retention(Status::Failed), Some(days(14)));
        config.retain_failed = Some(days(90));
        config.retain_cancelled = Some(Duration::ZERO);
        assert_eq!(config.retention(Status::Failed), Some(days(90)));
        assert_eq!(config.retention(Status::Cancelled), None);
        assert_eq!(config.retention(Status::Completed), Some(days(14)));
        config.retain_finished = Duration::ZERO;
        assert_eq!(config.retention(Status::Completed), None);
        assert_eq!(config.retention(Status::Pending), None);
    }

    #[test]
    fn a_statement_timeout_below_a_millisecond_is_rejected_and_zero_means_none() {
        let mut config = Config::with_database_url("postgres://x@y/z");
        config.db_statement_timeout = Duration::from_micros(500);
        assert!(config
            .validate()
            .unwrap_err()
            .contains("--db-statement-timeout"));
        config.db_statement_timeout = Duration::ZERO;
        config.validate().unwrap();
    }

    #[test]
    fn a_public_address_needs_tls_and_auth_or_insecure() {
        let mut config = Config::with_database_url("postgres://x@y/z");
        config.listen = "0.0.0.0:50051".parse().unwrap();
        // Nothing is served by migrate: the configuration itself is valid.
        config.validate().unwrap();
        assert!(config.check_exposure().unwrap_err().contains("--insecure"));
        config.tls_cert = Some("cert.pem".into());
        config.tls_key = Some("key.pem".into());
        assert!(config
            .check_exposure()
            .unwrap_err()
            .contains("--auth required"));
        config.auth = Auth::Required;
        config.check_exposure().unwrap();
        config.tls_cert = None;
        config.tls_key = None;
        config.insecure = true;
        config.check_exposure().unwrap();
    }

    #[test]
    fn lease_out_of_range_is_rejected() {
        let mut config = Config::with_database_url("postgres://x@y/z");
        config.lease_duration = Duration::from_millis(10);
        assert!(config.validate().unwrap_err().contains("--lease-duration"));
    }
}

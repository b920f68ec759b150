//! The operator commands of the `leasehold` binary: `task create|get|list|
//! cancel|retry|purge`, `stats`, `workers` and `watch`.
//!
//! Every command talks to a server through [`crate::client::Client`] only,
//! never to the database, so it works against any node of any deployment.
//! Output goes to standard output: aligned tables for people by default,
//! or with `--json` one JSON object per line (see the `json` module for the mapping).
//! Errors go to standard error as `error: <what>`.
//!
//! Exit codes, one rule each:
//! - 0: the command did what it was asked.
//! - 1: the server said no (`error: NOT_FOUND: ...`, the gRPC code and the
//!   server's message), the server could not be reached, or it ended a
//!   stream.
//! - 2: usage — anything the command can tell is wrong before it calls the
//!   server: unknown flags or values, missing arguments, `--params` that is
//!   not a JSON object, a malformed duration or time, a bad `--from-file`
//!   line, an unparsable `--server`. What only the server checks (e.g. that
//!   an id is a UUID, the task type's characters) is its INVALID_ARGUMENT,
//!   so exit 1 — except in `--from-file` lines, which are checked against
//!   the server's own field rules before the first call: a file of more
//!   than 10,000 tasks takes several calls, and a refusal of a later one
//!   could not undo the earlier ones.
//!
//! `--server` takes a comma-separated list (`LEASEHOLD_SERVER` too, as for
//! `leasehold worker`); a command uses the first server that answers.

mod filter;
mod human;
mod json;
mod parse;
mod stats;
mod task;
mod token;
mod watch;
mod workers;

use crate::wire::convert::code_name;
use std::io::Write;
use std::process::ExitCode;

use crate::client::{self, Client};
use crate::error::chain;

pub use stats::StatsArgs;
pub use task::{CancelArgs, CreateArgs, GetArgs, ListArgs, PurgeArgs, RetryArgs, TaskCommand};
pub use token::{CreateTokenArgs, RevokeTokenArgs, TokenCommand, TokenTarget};
pub use watch::WatchArgs;
pub use workers::WorkersArgs;

/// Options every operator command takes: where the server is, and how to
/// print.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Options {
    /// Server addresses, comma-separated (`host:port` or `http://` URIs),
    /// as `leasehold worker` takes them: the first that answers is used.
    #[arg(
        long,
        env = "LEASEHOLD_SERVER",
        default_value = client::DEFAULT_SERVER,
        value_delimiter = ','
    )]
    pub(crate) server: Vec<String>,

    /// PEM file of the certificate authorities to trust for `https://`
    /// servers instead of the system's (a bare `host:port` then means
    /// `https://`).
    #[arg(long, env = "LEASEHOLD_TLS_CA")]
    pub(crate) tls_ca: Option<std::path::PathBuf>,

    /// Bearer token sent with every call, for a node with `--auth required`.
    #[arg(long, env = "LEASEHOLD_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,

    /// Print JSON, one object per line, instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

impl Options {
    async fn connect(&self) -> Result<Client, Failure> {
        let tls = match &self.tls_ca {
            Some(ca) => Some(client::Tls::new().ca_file(ca)?),
            None => None,
        };
        let client = Client::connect_any_with(&self.server, tls.as_ref()).await?;
        Ok(match &self.token {
            Some(token) => client.with_token(token)?,
            None => client,
        })
    }
}

/// Runs `leasehold task ...` and returns the process exit code.
pub async fn task(command: TaskCommand) -> ExitCode {
    exit(task::run(command).await)
}

/// Runs `leasehold stats` and returns the process exit code.
pub async fn stats(args: StatsArgs) -> ExitCode {
    exit(stats::run(args).await)
}

/// Runs `leasehold workers` and returns the process exit code.
pub async fn workers(args: WorkersArgs) -> ExitCode {
    exit(workers::run(args).await)
}

/// Runs `leasehold token ...` and returns the process exit code.
pub async fn token(command: TokenCommand) -> ExitCode {
    exit(token::run(command).await)
}

/// Runs `leasehold watch` until Ctrl-C or SIGTERM (exit 0) or until the
/// server ends the stream (exit 1), and returns the process exit code.
pub async fn watch(args: WatchArgs) -> ExitCode {
    exit(watch::run(args).await)
}

/// Why a command stopped early.
#[derive(Debug)]
enum Failure {
    /// The command line (or a file it names) is wrong; exit 2.
    Usage(String),
    /// The call failed or the server refused it; exit 1.
    Client(client::Error),
    /// The same, already described (with what had been done before);
    /// exit 1.
    Refused(String),
    /// Standard output or a file could not be read or written.
    Io(std::io::Error),
}

impl From<client::Error> for Failure {
    fn from(err: client::Error) -> Self {
        match err {
            // Checked before any call, so it is the command line's fault.
            client::Error::InvalidAddress { .. } | client::Error::InvalidConfig(_) => {
                Failure::Usage(chain(&err))
            }
            err => Failure::Client(err),
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(err: std::io::Error) -> Self {
        Failure::Io(err)
    }
}

/// Prints what went wrong and picks the exit code.
fn exit(result: Result<(), Failure>) -> ExitCode {
    let (message, code) = match result {
        Ok(()) => return ExitCode::SUCCESS,
        // A reader that went away (`leasehold task list | head`) is not a
        // failure of the command.
        Err(Failure::Io(err)) if err.kind() == std::io::ErrorKind::BrokenPipe => {
            return ExitCode::SUCCESS
        }
        Err(Failure::Usage(message)) => (message, 2),
        Err(Failure::Client(err)) => (describe(&err), 1),
        Err(Failure::Refused(message)) => (message, 1),
        Err(Failure::Io(err)) => (err.to_string(), 1),
    };
    // Nothing more can be done if standard error is gone too.
    let _ = writeln!(std::io::stderr(), "error: {message}");
    ExitCode::from(code)
}

/// `CODE: message` for a status, the full cause chain otherwise (a
/// connection failure names the address and what the OS said).
fn describe(err: &client::Error) -> String {
    match err.status() {
        Some(status) => format!("{}: {}", code_name(status.code()), status.message()),
        None => chain(err),
    }
}

/// Writes one line to standard output. Standard output is line-buffered,
/// so each line reaches a pipe reader (e.g. of `watch --json`) at once.
fn print_line(line: impl std::fmt::Display) -> Result<(), Failure> {
    writeln!(std::io::stdout().lock(), "{line}")?;
    Ok(())
}

/// Writes a note for people to standard error, which scripts do not parse.
fn note(text: impl std::fmt::Display) {
    // A closed standard error is no reason to fail the command.
    let _ = writeln!(std::io::stderr(), "{text}");
}

/// Writes a JSON value as one line.
fn print_json(value: &serde_json::Value) -> Result<(), Failure> {
    print_line(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_print_their_canonical_code() {
        let err = client::Error::from(tonic::Status::not_found("task 1 does not exist"));
        assert_eq!(describe(&err), "NOT_FOUND: task 1 does not exist");
    }
}

//! The `leasehold` binary: parses the command line and calls the library.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use leasehold::config::Config;

/// Leasehold: a gRPC server that hands out tasks to workers as leases,
/// backed by Postgres.
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    /// Log as one JSON object per line instead of text.
    #[arg(long, env = "LEASEHOLD_LOG_JSON", global = true)]
    log_json: bool,

    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    config: Config,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve(Box<ServeArgs>),
    /// Create the database if needed, apply migrations, and exit.
    Migrate(Box<ServeArgs>),
    /// Run a benchmark scenario against a server (or an in-process node).
    Bench(leasehold::bench::BenchArgs),
    /// Create, inspect, cancel, retry and purge tasks on a server.
    #[command(subcommand)]
    Task(leasehold::cli::TaskCommand),
    /// Show task counts per status and task type.
    Stats(leasehold::cli::StatsArgs),
    /// List the worker sessions connected to any node.
    Workers(leasehold::cli::WorkersArgs),
    /// Create, list and revoke bearer tokens (on a server, or on the
    /// database directly with `--database-url`).
    #[command(subcommand)]
    Token(leasehold::cli::TokenCommand),
    /// Print live task events until Ctrl-C or SIGTERM.
    Watch(leasehold::cli::WatchArgs),
    /// Run a command once per task: the task as JSON on stdin, its result as
    /// JSON on stdout (`leasehold worker --task-type TYPE -- COMMAND ARGS...`).
    Worker(leasehold::runner::WorkerArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    config: Config,
}

/// Exit codes: 0 success, 1 failure (the server said no, or a server
/// command failed), 2 usage (clap's own code for a bad command line, and a
/// bad config file).
fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // A config file's settings become the environment variables they stand
    // for, where those are not set: flags override the environment, which
    // overrides the file. This runs before any thread exists.
    // Only the commands that run a node read it (a server's file must not
    // point `bench` or `worker` at its database).
    let runs_a_node = match Cli::command().try_get_matches_from(&args) {
        Ok(matches) => matches!(matches.subcommand_name(), None | Some("serve" | "migrate")),
        // The real parse below reports what is wrong, with the file's
        // settings applied if the command would read it.
        Err(_) => !args.iter().skip(1).any(|arg| {
            let arg = arg.to_string_lossy();
            Cli::command()
                .get_subcommands()
                .any(|sub| sub.get_name() == arg && arg != "serve" && arg != "migrate")
        }),
    };
    if let Some(path) = leasehold::config::file_named(&args).filter(|_| runs_a_node) {
        match leasehold::config::file_environment(&path) {
            Ok(settings) => {
                for (name, value) in settings {
                    if std::env::var_os(&name).is_none() {
                        std::env::set_var(name, value);
                    }
                }
            }
            Err(err) => {
                eprintln!("error: {err}");
                return ExitCode::from(2);
            }
        }
    }
    let matches = Cli::command().get_matches_from(&args);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(err) => err.exit(),
    };
    // The effective configuration, for the commands that run a node.
    let print_config = || {
        let settings = match matches.subcommand() {
            Some(("serve" | "migrate", sub)) => sub,
            _ => &matches,
        };
        print!("{}", leasehold::config::render(settings));
        ExitCode::SUCCESS
    };
    match &cli.command {
        None if cli.config.print_config => return print_config(),
        Some(Command::Serve(args) | Command::Migrate(args)) if args.config.print_config => {
            return print_config()
        }
        _ => {}
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    leasehold::telemetry::init(cli.log_json);
    match cli.command {
        None => report(serve(cli.config).await),
        Some(Command::Serve(args)) => report(serve(args.config).await),
        Some(Command::Migrate(args)) => report(migrate(args.config).await),
        Some(Command::Bench(args)) => report(leasehold::bench::run(args).await.map_err(Into::into)),
        Some(Command::Task(command)) => leasehold::cli::task(command).await,
        Some(Command::Stats(args)) => leasehold::cli::stats(args).await,
        Some(Command::Workers(args)) => leasehold::cli::workers(args).await,
        Some(Command::Watch(args)) => leasehold::cli::watch(args).await,
        Some(Command::Token(command)) => leasehold::cli::token(command).await,
        Some(Command::Worker(args)) => {
            report(leasehold::runner::run(args).await.map_err(Into::into))
        }
    }
}

/// Exit 1 with the error and its causes, as `main` returning an
/// `anyhow::Result` would print them.
fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("Error: {err:?}");
            ExitCode::FAILURE
        }
    }
}

async fn migrate(config: Config) -> anyhow::Result<()> {
    leasehold::server::migrate(&config).await?;
    tracing::info!("database is up to date");
    Ok(())
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let running = leasehold::server::start(config, listener).await?;
    running
        .run_until(async {
            leasehold::signal::shutdown().await;
            tracing::info!("shutdown signal received: draining sessions, finishing calls");
        })
        .await?;
    Ok(())
}

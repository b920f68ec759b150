//! The `leasehold` binary: parses the command line and calls the library.

use clap::{Parser, Subcommand};
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
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    config: Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    leasehold::telemetry::init(cli.log_json);
    match cli.command {
        None => serve(cli.config).await,
        Some(Command::Serve(args)) => serve(args.config).await,
        Some(Command::Migrate(args)) => {
            leasehold::server::prepare_database(&args.config).await?;
            tracing::info!("database is up to date");
            Ok(())
        }
        Some(Command::Bench(args)) => leasehold::bench::run(args).await,
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let running = leasehold::server::start(config, listener).await?;
    running
        .run_until(async {
            shutdown_signal().await;
            tracing::info!("shutdown signal received: draining sessions, finishing calls");
        })
        .await?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler cannot fail on unix");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

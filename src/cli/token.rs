//! `leasehold token create|list|revoke`: bearer tokens, through a server
//! (with an admin token) or, with `--database-url`, on the database itself:
//! how the first admin token of a fresh install is made, with no server
//! running and no token to show it.

use std::time::Duration;

use serde_json::{json, Value};

use super::{human, json as json_out, note, print_json, print_line, Failure, Options};
use crate::model::Role;
use crate::proto;
use crate::wire::convert;

/// `leasehold token ...`.
#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Create a token and print its secret (shown only this once).
    Create(CreateTokenArgs),
    /// List every token, newest first (never their secrets).
    List(TokenTarget),
    /// Revoke a token: every node refuses it within seconds, and its open
    /// worker sessions are closed.
    Revoke(RevokeTokenArgs),
}

/// Where the tokens are: a server, or the database directly.
#[derive(Debug, clap::Args)]
pub struct TokenTarget {
    /// Work on this Postgres database directly instead of through a server
    /// (it is created and migrated if need be).
    #[arg(long)]
    pub(crate) database_url: Option<String>,

    /// Where the server is, and how to print.
    #[command(flatten)]
    pub(crate) options: Options,
}

/// Arguments of `leasehold token create`.
#[derive(Debug, clap::Args)]
pub struct CreateTokenArgs {
    /// What the token may do: `worker` (WorkerService), `producer` (create,
    /// get, list, stats, watch) or `admin` (everything).
    #[arg(long, value_parser = ["worker", "producer", "admin"])]
    pub(crate) role: String,

    /// Worker tokens only: the task types it may take, comma-separated
    /// (default: any).
    #[arg(long, value_delimiter = ',')]
    pub(crate) task_types: Vec<String>,

    /// How long it works, e.g. `30d` (default: until revoked).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) expires_in: Option<Duration>,

    /// Free text for operators: who holds it, what for.
    #[arg(long, default_value = "")]
    pub(crate) description: String,

    /// Where the tokens are.
    #[command(flatten)]
    pub(crate) target: TokenTarget,
}

/// Arguments of `leasehold token revoke`.
#[derive(Debug, clap::Args)]
pub struct RevokeTokenArgs {
    /// The token's id (as `token list` shows it).
    pub(crate) id: String,

    /// Where the tokens are.
    #[command(flatten)]
    pub(crate) target: TokenTarget,
}

/// The name of a token's role on the wire (`unknown` for a value this
/// build does not know).
fn role_name(value: i32) -> &'static str {
    crate::wire::field::role("role", value).map_or("unknown", Role::as_str)
}

fn token_json(token: &proto::Token) -> Value {
    let time = |t: Option<&prost_types::Timestamp>| t.and_then(json_out::timestamp);
    json!({
        "id": token.id,
        "role": role_name(token.role),
        "task_types": token.task_types,
        "description": token.description,
        "created_at": time(token.created_at.as_ref()),
        "expires_at": time(token.expires_at.as_ref()),
        "revoked_at": time(token.revoked_at.as_ref()),
    })
}

pub(super) async fn run(command: TokenCommand) -> Result<(), Failure> {
    match command {
        TokenCommand::Create(args) => {
            let request = proto::CreateTokenRequest {
                // clap allows only the three names.
                role: Role::parse(&args.role).map_or(0, |r| convert::role_to_proto(r) as i32),
                task_types: args.task_types.clone(),
                expires_in: args.expires_in.map(convert::duration),
                description: args.description.clone(),
            };
            // The server's own checks, before anything is sent or written.
            crate::wire::request::token_create(&request, std::time::SystemTime::now())
                .map_err(|err| Failure::Usage(err.to_string()))?;
            let created = match &args.target.database_url {
                Some(url) => direct::create(url, &request).await?,
                None => {
                    args.target
                        .options
                        .connect()
                        .await?
                        .create_token(request)
                        .await?
                }
            };
            let token = created.token.unwrap_or_default();
            if args.target.options.json {
                let mut line = token_json(&token);
                line["secret"] = Value::String(created.secret);
                return print_json(&line);
            }
            print_line(&created.secret)?;
            note(format!(
                "created {} token {}; its secret, above, is shown only this once",
                role_name(token.role),
                token.id
            ));
            Ok(())
        }
        TokenCommand::List(target) => {
            let tokens = match &target.database_url {
                Some(url) => direct::list(url).await?,
                None => target.options.connect().await?.list_tokens().await?,
            };
            if target.options.json {
                for token in &tokens {
                    print_json(&token_json(token))?;
                }
                return Ok(());
            }
            if tokens.is_empty() {
                return print_line("no tokens");
            }
            let mut table = human::table(
                &[
                    "ID",
                    "ROLE",
                    "TYPES",
                    "CREATED",
                    "EXPIRES",
                    "REVOKED",
                    "DESCRIPTION",
                ],
                &[],
            );
            for token in &tokens {
                let types = if token.task_types.is_empty() {
                    "*".to_owned()
                } else {
                    token.task_types.join(",")
                };
                table.add_row(vec![
                    token.id.clone(),
                    role_name(token.role).to_owned(),
                    types,
                    human::time(token.created_at.as_ref()),
                    human::time(token.expires_at.as_ref()),
                    human::time(token.revoked_at.as_ref()),
                    human::or_none(Some(&token.description)),
                ]);
            }
            print_line(human::render(&table))
        }
        TokenCommand::Revoke(args) => {
            let token = match &args.target.database_url {
                Some(url) => direct::revoke(url, &args.id).await?,
                None => {
                    args.target
                        .options
                        .connect()
                        .await?
                        .revoke_token(&args.id)
                        .await?
                }
            };
            if args.target.options.json {
                return print_json(&token_json(&token));
            }
            print_line(format!("revoked token {}", token.id))
        }
    }
}

/// The same on the database itself, with the server's own store.
#[cfg(feature = "server")]
mod direct {
    use super::Failure;
    use crate::proto;

    fn failed(err: String) -> Failure {
        Failure::Refused(err)
    }

    pub(super) async fn create(
        url: &str,
        request: &proto::CreateTokenRequest,
    ) -> Result<proto::CreateTokenResponse, Failure> {
        crate::server::token_create_direct(url, request)
            .await
            .map_err(failed)
    }

    pub(super) async fn list(url: &str) -> Result<Vec<proto::Token>, Failure> {
        crate::server::token_list_direct(url).await.map_err(failed)
    }

    pub(super) async fn revoke(url: &str, id: &str) -> Result<proto::Token, Failure> {
        crate::server::token_revoke_direct(url, id)
            .await
            .map_err(failed)
    }
}

/// Without the server's store, `--database-url` cannot be served.
#[cfg(not(feature = "server"))]
mod direct {
    use super::Failure;
    use crate::proto;

    fn unsupported() -> Failure {
        Failure::Usage("--database-url: this build has no database support; use --server".into())
    }

    pub(super) async fn create(
        _url: &str,
        _request: &proto::CreateTokenRequest,
    ) -> Result<proto::CreateTokenResponse, Failure> {
        Err(unsupported())
    }

    pub(super) async fn list(_url: &str) -> Result<Vec<proto::Token>, Failure> {
        Err(unsupported())
    }

    pub(super) async fn revoke(_url: &str, _id: &str) -> Result<proto::Token, Failure> {
        Err(unsupported())
    }
}

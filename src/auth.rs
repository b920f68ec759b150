//! Bearer tokens: making them, checking them, and which role may make
//! which call.
//!
//! A token's secret is 32 random bytes (`lh_` and 64 hex digits); the
//! database keeps its SHA-256 only. Checks go through a cache that asks the
//! database again about any token it has not looked up for
//! [`RECHECK`], so a revoked or expired token stops working on every node
//! within that (and an open session using it, which re-checks as often, is
//! closed). While the database cannot be asked, a token seen before keeps
//! its last answer: an outage is not a reason to cut off every worker.
//!
//! It never sees protobuf: the gRPC layer (`api::auth`) asks it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use rand::RngCore;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::model::{NewToken, Role, Token};
use crate::store::{self, Store};

/// How long a token's last answer from the database is trusted.
pub(crate) const RECHECK: Duration = Duration::from_secs(2);

/// Secrets looked up in the database at once, per node.
const LOOKUPS_AT_ONCE: usize = 4;

/// Secrets remembered at most.
const CACHE_MAX: usize = 10_000;

/// The prefix of every secret, so that one is recognised in a config file
/// or a leaked log.
const SECRET_PREFIX: &str = "lh_";

/// The hash a secret is stored and looked up by.
pub(crate) type SecretHash = [u8; 32];

/// A fresh secret and its hash.
pub(crate) fn secret_new() -> (String, SecretHash) {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let mut secret = String::with_capacity(SECRET_PREFIX.len() + 64);
    secret.push_str(SECRET_PREFIX);
    for byte in bytes {
        secret.push_str(&format!("{byte:02x}"));
    }
    let hash = secret_hash(&secret);
    (secret, hash)
}

/// The hash of a secret as a client sent it.
pub(crate) fn secret_hash(secret: &str) -> SecretHash {
    Sha256::digest(secret.as_bytes()).into()
}

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// No usable token: missing, malformed, unknown, expired or revoked.
    Unauthenticated(String),
    /// The database could not be asked about a token never seen.
    Unavailable(String),
}

/// Who is calling: the token, and the hash its secret is known by.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub(crate) token: Token,
    pub(crate) hash: SecretHash,
}

/// Which roles may make a call, by gRPC path; `None`: anyone, with or
/// without a token (health, reflection).
pub(crate) fn roles_for(path: &str) -> Option<&'static [Role]> {
    const WORKER: &[Role] = &[Role::Worker, Role::Admin];
    const PRODUCER: &[Role] = &[Role::Producer, Role::Admin];
    const ADMIN: &[Role] = &[Role::Admin];
    if path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.") {
        return None;
    }
    let Some(method) = path.strip_prefix("/leasehold.v1.") else {
        // Not ours: it will be UNIMPLEMENTED, but only for a valid caller.
        return Some(ADMIN);
    };
    Some(match method.split_once('/') {
        Some(("WorkerService", _)) => WORKER,
        Some((
            "TaskService",
            "CreateTask" | "CreateTasks" | "GetTask" | "ListTasks" | "GetStats" | "WatchTasks",
        )) => PRODUCER,
        _ => ADMIN,
    })
}

#[derive(Debug, Clone)]
struct Cached {
    token: Option<Token>,
    fetched: Instant,
}

/// Checks tokens against the database, through a short-lived cache.
#[derive(Debug)]
pub(crate) struct Authenticator {
    store: Store,
    cache: Mutex<HashMap<SecretHash, Cached>>,
    /// Lookups of uncached secrets at once: a flood of made-up tokens
    /// queues here instead of taking every pooled connection.
    lookups: tokio::sync::Semaphore,
}

impl Authenticator {
    /// An authenticator over the tokens in `store`.
    pub(crate) fn new(store: Store) -> Self {
        Self {
            store,
            cache: Mutex::new(HashMap::new()),
            lookups: tokio::sync::Semaphore::new(LOOKUPS_AT_ONCE),
        }
    }

    /// The caller an `authorization` header value names, if its token is
    /// valid now.
    pub(crate) async fn authenticate(&self, header: Option<&str>) -> Result<Caller, Refusal> {
        let header = header.ok_or_else(|| {
            Refusal::Unauthenticated(
                "authorization: missing; send `authorization: Bearer <token>`".into(),
            )
        })?;
        let secret = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|secret| !secret.is_empty())
            .ok_or_else(|| {
                Refusal::Unauthenticated("authorization: expected `Bearer <token>`".into())
            })?;
        // A secret of another shape cannot be one of ours: refused without
        // asking the database, so garbage costs no query.
        let ours = secret.len() == SECRET_PREFIX.len() + 64
            && secret.starts_with(SECRET_PREFIX)
            && secret[SECRET_PREFIX.len()..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !ours {
            return Err(Refusal::Unauthenticated(
                "authorization: not a leasehold token (`lh_` and 64 hex digits)".into(),
            ));
        }
        let hash = secret_hash(secret);
        let token = self.token(&hash).await?;
        Ok(Caller { token, hash })
    }

    /// Whether the token behind `hash` still works (for open sessions).
    /// An unanswerable database keeps the last answer.
    pub(crate) async fn still_valid(&self, hash: &SecretHash) -> bool {
        !matches!(self.token(hash).await, Err(Refusal::Unauthenticated(_)))
    }

    async fn token(&self, hash: &SecretHash) -> Result<Token, Refusal> {
        let cached = self.cache.lock().expect("lock poisoned").get(hash).cloned();
        let token = match cached {
            Some(cached) if cached.fetched.elapsed() < RECHECK => cached.token,
            stale => match self.lookup(hash).await {
                Ok(token) => {
                    let mut cache = self.cache.lock().expect("lock poisoned");
                    // Unknown secrets are remembered too (a client retrying
                    // a bad token costs one query per RECHECK), but not
                    // without bound: past it the cache starts over, which
                    // costs each live token one query.
                    if cache.len() >= CACHE_MAX {
                        cache.clear();
                    }
                    cache.insert(
                        *hash,
                        Cached {
                            token: token.clone(),
                            fetched: Instant::now(),
                        },
                    );
                    token
                }
                Err(err) => match stale {
                    Some(stale) => {
                        tracing::debug!(error = %err, "cannot re-check a token; keeping its last answer");
                        stale.token
                    }
                    None => {
                        tracing::warn!(error = %err, "cannot check a token");
                        return Err(Refusal::Unavailable(
                            "database unavailable, try again".into(),
                        ));
                    }
                },
            },
        };
        let token =
            token.ok_or_else(|| Refusal::Unauthenticated("authorization: unknown token".into()))?;
        if token.revoked_at.is_some() {
            return Err(Refusal::Unauthenticated(format!(
                "authorization: token {} was revoked",
                token.id
            )));
        }
        if !token.is_valid_at(SystemTime::now()) {
            return Err(Refusal::Unauthenticated(format!(
                "authorization: token {} has expired",
                token.id
            )));
        }
        Ok(token)
    }

    async fn lookup(&self, hash: &SecretHash) -> store::Result<Option<Token>> {
        let _permit = self.lookups.acquire().await.expect("never closed");
        self.store.token_by_hash(hash).await
    }

    /// Creates a token; returns it with its secret, shown this once.
    pub(crate) async fn token_create(&self, new: &NewToken) -> store::Result<(Token, String)> {
        create(&self.store, new).await
    }

    /// Every token, newest first.
    pub(crate) async fn token_list(&self) -> store::Result<Vec<Token>> {
        self.store.token_list().await
    }

    /// Revokes a token; `None` if there is none with this id. Every node
    /// refuses it within [`RECHECK`].
    pub(crate) async fn token_revoke(&self, id: Uuid) -> store::Result<Option<Token>> {
        self.store.token_revoke(id).await
    }
}

/// Creates a token in `store` (also without a server, for the first admin
/// token of a fresh install).
pub(crate) async fn create(store: &Store, new: &NewToken) -> store::Result<(Token, String)> {
    let (secret, hash) = secret_new();
    let token = store.token_insert(new, &hash).await?;
    tracing::info!(token_id = %token.id, role = token.role.as_str(), "token created");
    Ok((token, secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_fresh_and_hash_to_what_a_client_sends() {
        let (a, hash) = secret_new();
        let (b, _) = secret_new();
        assert_ne!(a, b);
        assert!(a.starts_with("lh_") && a.len() == 67, "{a}");
        assert_eq!(secret_hash(&a), hash);
    }

    #[test]
    fn each_call_has_its_roles() {
        let roles = |path| roles_for(path).map(<[Role]>::to_vec);
        assert_eq!(roles("/grpc.health.v1.Health/Check"), None);
        assert_eq!(
            roles("/leasehold.v1.WorkerService/Connect"),
            Some(vec![Role::Worker, Role::Admin])
        );
        assert_eq!(
            roles("/leasehold.v1.TaskService/CreateTasks"),
            Some(vec![Role::Producer, Role::Admin])
        );
        assert_eq!(
            roles("/leasehold.v1.TaskService/PurgeTasks"),
            Some(vec![Role::Admin])
        );
        assert_eq!(
            roles("/leasehold.v1.TokenService/CreateToken"),
            Some(vec![Role::Admin])
        );
        assert_eq!(roles("/other.Service/Call"), Some(vec![Role::Admin]));
    }
}

//! Bearer tokens: only the hash of a secret is stored, and a token is found
//! by it.

use std::time::SystemTime;

use tokio_postgres::Row;
use uuid::Uuid;

use super::{Error, Result, Store};
use crate::model::{NewToken, Role, Token};

const TOKEN_INSERT: &str = "INSERT INTO api_token (id, secret_hash, role, task_types, \
       description, expires_at) VALUES ($1, $2, $3, $4, $5, $6) \
     RETURNING id, role, task_types, description, created_at, expires_at, revoked_at";

const TOKEN_BY_HASH: &str = "SELECT id, role, task_types, description, created_at, \
       expires_at, revoked_at FROM api_token WHERE secret_hash = $1";

const TOKEN_LIST: &str = "SELECT id, role, task_types, description, created_at, expires_at, \
       revoked_at FROM api_token ORDER BY created_at DESC, id DESC";

// A second revoke keeps the first revocation time.
const TOKEN_REVOKE: &str = "UPDATE api_token SET revoked_at = COALESCE(revoked_at, now()) \
     WHERE id = $1 \
     RETURNING id, role, task_types, description, created_at, expires_at, revoked_at";

/// Every statement of this module, for the preparation test.
#[cfg(test)]
pub(super) const STATEMENTS: &[&str] = &[TOKEN_INSERT, TOKEN_BY_HASH, TOKEN_LIST, TOKEN_REVOKE];

fn token_from_row(row: &Row) -> Result<Token> {
    let role: &str = row.try_get("role")?;
    Ok(Token {
        id: row.try_get("id")?,
        role: Role::parse(role)
            .ok_or_else(|| Error::Other(format!("unknown token role {role:?}")))?,
        task_types: row.try_get("task_types")?,
        description: row.try_get("description")?,
        created_at: row.try_get::<_, SystemTime>("created_at")?,
        expires_at: row.try_get("expires_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

impl Store {
    /// Stores a token under the hash of its secret.
    pub(crate) async fn token_insert(&self, token: &NewToken, secret_hash: &[u8]) -> Result<Token> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(TOKEN_INSERT).await?;
        let row = client
            .query_one(
                &stmt,
                &[
                    &Uuid::now_v7(),
                    &secret_hash,
                    &token.role.as_str(),
                    &token.task_types,
                    &token.description,
                    &token.expires_at,
                ],
            )
            .await?;
        token_from_row(&row)
    }

    /// The token whose secret hashes to `secret_hash`, revoked or not.
    pub(crate) async fn token_by_hash(&self, secret_hash: &[u8]) -> Result<Option<Token>> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(TOKEN_BY_HASH).await?;
        client
            .query_opt(&stmt, &[&secret_hash])
            .await?
            .as_ref()
            .map(token_from_row)
            .transpose()
    }

    /// Every token, newest first.
    pub(crate) async fn token_list(&self) -> Result<Vec<Token>> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(TOKEN_LIST).await?;
        client
            .query(&stmt, &[])
            .await?
            .iter()
            .map(token_from_row)
            .collect()
    }

    /// Revokes a token; `None` if there is no such token.
    pub(crate) async fn token_revoke(&self, id: Uuid) -> Result<Option<Token>> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(TOKEN_REVOKE).await?;
        client
            .query_opt(&stmt, &[&id])
            .await?
            .as_ref()
            .map(token_from_row)
            .transpose()
    }
}

//! `leasehold.v1.TokenService`: creating, listing and revoking bearer
//! tokens (admin tokens only; the auth layer checks that).

use std::sync::Arc;
use std::time::SystemTime;

use tonic::{Request, Response, Status};

use crate::auth::Authenticator;
use crate::error::Error;
use crate::wire::proto::{self, token_service_server::TokenService};
use crate::wire::{convert, request};

/// Implements `TokenService` over the node's authenticator.
#[derive(Debug, Clone)]
pub(crate) struct TokenApi {
    auth: Arc<Authenticator>,
}

impl TokenApi {
    /// The service over `auth`.
    pub(crate) fn new(auth: Arc<Authenticator>) -> Self {
        Self { auth }
    }
}

#[tonic::async_trait]
impl TokenService for TokenApi {
    async fn create_token(
        &self,
        request: Request<proto::CreateTokenRequest>,
    ) -> Result<Response<proto::CreateTokenResponse>, Status> {
        let new = request::token_create(request.get_ref(), SystemTime::now())?;
        let (token, secret) = self.auth.token_create(&new).await.map_err(Error::from)?;
        Ok(Response::new(proto::CreateTokenResponse {
            token: Some(convert::token_to_proto(&token)),
            secret,
        }))
    }

    async fn list_tokens(
        &self,
        _request: Request<proto::ListTokensRequest>,
    ) -> Result<Response<proto::ListTokensResponse>, Status> {
        let tokens = self.auth.token_list().await.map_err(Error::from)?;
        Ok(Response::new(proto::ListTokensResponse {
            tokens: tokens.iter().map(convert::token_to_proto).collect(),
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<proto::RevokeTokenRequest>,
    ) -> Result<Response<proto::RevokeTokenResponse>, Status> {
        let id = request::token_id(&request.get_ref().id)?;
        match self.auth.token_revoke(id).await.map_err(Error::from)? {
            Some(token) => {
                tracing::info!(token_id = %id, "token revoked");
                Ok(Response::new(proto::RevokeTokenResponse {
                    token: Some(convert::token_to_proto(&token)),
                }))
            }
            None => Err(Error::NotFound(format!("token {id} not found")).into()),
        }
    }
}

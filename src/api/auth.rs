//! Authentication and the role check of every call, before any service
//! sees it: a tower layer around all services. A refused call never reaches
//! a handler, so nothing is written; an allowed one carries its
//! [`Caller`] in the request's extensions, for the checks that need the
//! request itself (a worker token's task types, an open session's token).
//!
//! With authentication off (`--auth off`) the layer lets everything through
//! and no call has a caller.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::codegen::http;
use tonic::Status;

use crate::auth::{roles_for, Authenticator, Caller, Refusal};
use crate::error::Error;

/// Checks every call's token, when authentication is on.
#[derive(Debug, Clone)]
pub(crate) struct AuthLayer {
    auth: Option<Arc<Authenticator>>,
}

impl AuthLayer {
    /// A layer checking tokens with `auth`; `None` lets every call through.
    pub(crate) fn new(auth: Option<Arc<Authenticator>>) -> Self {
        Self { auth }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = Authenticated<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticated {
            inner,
            auth: self.auth.clone(),
        }
    }
}

/// A service whose calls are authenticated (see [`AuthLayer`]).
#[derive(Debug, Clone)]
pub(crate) struct Authenticated<S> {
    inner: S,
    auth: Option<Arc<Authenticator>>,
}

/// The status a refusal is answered with.
fn refused(refusal: Refusal) -> Status {
    match refusal {
        Refusal::Unauthenticated(message) => Error::Unauthenticated(message),
        Refusal::Unavailable(message) => Error::Unavailable(message),
    }
    .into_status()
}

impl<S, B> tower_service::Service<http::Request<B>> for Authenticated<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The service that was polled ready serves this call; a clone takes
        // its place for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let Some(auth) = self.auth.clone() else {
            return Box::pin(inner.call(request));
        };
        Box::pin(async move {
            let path = request.uri().path().to_owned();
            let Some(roles) = roles_for(&path) else {
                return inner.call(request).await;
            };
            let header = request
                .headers()
                .get(http::header::AUTHORIZATION)
                .map(|value| value.to_str().unwrap_or(""));
            let status = match auth.authenticate(header).await {
                Ok(caller) if roles.contains(&caller.token.role) => {
                    request.extensions_mut().insert(caller);
                    return inner.call(request).await;
                }
                Ok(Caller { token, .. }) => Error::PermissionDenied(format!(
                    "token {} has the {} role, which may not call {path}",
                    token.id,
                    token.role.as_str()
                ))
                .into_status(),
                Err(refusal) => refused(refusal),
            };
            Ok(status.into_http())
        })
    }
}

/// The caller of a call, when authentication is on.
pub(crate) fn caller<T>(request: &tonic::Request<T>) -> Option<&Caller> {
    request.extensions().get::<Caller>()
}

/// Refuses a worker token's call for task types it is not limited to.
pub(crate) fn check_task_types(
    caller: Option<&Caller>,
    task_types: &[String],
) -> Result<(), Status> {
    match caller {
        Some(caller) if !caller.token.allows_task_types(task_types) => {
            Err(Error::PermissionDenied(format!(
                "task_types: token {} may only take {}",
                caller.token.id,
                caller.token.task_types.join(", ")
            ))
            .into_status())
        }
        _ => Ok(()),
    }
}

/// How often a call that lasts (a session, a watch, a long poll) asks
/// whether its token still works (the answer is at most `auth::RECHECK`
/// old): within 5 s of a revocation it ends.
const TOKEN_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Completes once `caller`'s token stops working (revoked or expired);
/// never, when the call has no caller (authentication off).
pub(crate) fn until_revoked(
    auth: Option<Arc<Authenticator>>,
    caller: Option<Caller>,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    match (auth, caller) {
        (Some(auth), Some(caller)) => Box::pin(async move {
            loop {
                tokio::time::sleep(TOKEN_CHECK_INTERVAL).await;
                if !auth.still_valid(&caller.hash).await {
                    return;
                }
            }
        }),
        _ => Box::pin(std::future::pending()),
    }
}

/// The status a call that outlived its token ends with.
pub(crate) fn token_gone() -> Status {
    Error::Unauthenticated("authorization: the call's token was revoked or has expired".into())
        .into_status()
}

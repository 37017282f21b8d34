//! Authentication at the edge: an interceptor on each service reads `authorization: Bearer …` before
//! the request body is decoded. `Quota` accepts an API key (its caller goes into the request's
//! extensions, for the handlers to pass to the ledger, which checks the key's scope) or the admin
//! token; `QuotaAdmin` accepts the admin token only. Every failure is the same UNAUTHENTICATED answer,
//! whatever was wrong, and no answer or log line carries a credential.

use std::sync::Arc;

use tonic::{Request, Status, metadata::MetadataMap, service::Interceptor};

use super::{Context, status};
use crate::{
    auth::{API_KEY_PREFIX, bearer_credential, parse_api_key},
    config::AuthConfig,
    ledger::ApiKeyId,
};

/// Who a `Quota` request comes from, put in its extensions by [`QuotaGate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The admin token, or any caller with authentication off: not limited to a tenant.
    Operator,
    /// An API key, limited to its tenant and environments.
    ApiKey(ApiKeyId),
}

/// The API key a `Quota` request came with (`None` for an operator). A request the gate did not mark
/// is refused, so that a service mounted without its gate fails closed.
pub fn api_key_of<T>(request: &Request<T>) -> Result<Option<ApiKeyId>, Status> {
    match request.extensions().get::<Caller>() {
        Some(Caller::Operator) => Ok(None),
        Some(Caller::ApiKey(id)) => Ok(Some(id.clone())),
        None => Err(status::invalid_credentials()),
    }
}

/// The credential of a request's `authorization` header, if it is a bearer credential.
fn credential(metadata: &MetadataMap) -> Option<&str> {
    metadata.get("authorization").and_then(|value| bearer_credential(value.as_bytes()))
}

/// Authenticates `Quota` calls.
#[derive(Clone)]
pub struct QuotaGate {
    context: Arc<Context>,
    auth: Arc<AuthConfig>,
}

impl QuotaGate {
    pub fn new(context: Arc<Context>, auth: Arc<AuthConfig>) -> Self {
        Self { context, auth }
    }

    /// One lookup by key id, one SHA-256 and one constant-time comparison for an API key; a SHA-256 and
    /// a comparison for the admin token.
    fn caller(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        if !self.auth.enabled {
            return Ok(Caller::Operator);
        }
        let credential = credential(metadata).ok_or_else(status::invalid_credentials)?;
        if credential.starts_with(API_KEY_PREFIX) {
            let presented = parse_api_key(credential).ok_or_else(status::invalid_credentials)?;
            let key = self.context.ledger.api_key(presented.id).filter(|key| key.verify(&presented.hash));
            let key = key.ok_or_else(status::invalid_credentials)?;
            key.mark_used(self.context.clock.now_ms());
            return Ok(Caller::ApiKey(key.id().clone()));
        }
        match &self.auth.admin_token {
            Some(token) if token.matches(credential) => Ok(Caller::Operator),
            _ => Err(status::invalid_credentials()),
        }
    }
}

impl Interceptor for QuotaGate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = self.caller(request.metadata())?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// Authenticates `QuotaAdmin` calls: the admin token when one is configured. Without one (authentication
/// on) the server listens on loopback only, and admin calls are open to local callers.
#[derive(Clone)]
pub struct AdminGate {
    auth: Arc<AuthConfig>,
}

impl AdminGate {
    pub fn new(auth: Arc<AuthConfig>) -> Self {
        Self { auth }
    }
}

impl Interceptor for AdminGate {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = self.auth.admin_token.as_ref().filter(|_| self.auth.enabled) else {
            return Ok(request);
        };
        match credential(request.metadata()) {
            Some(credential) if token.matches(credential) => Ok(request),
            _ => Err(status::invalid_admin_token()),
        }
    }
}

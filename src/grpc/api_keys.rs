//! `QuotaAdmin` calls about API keys: creating one (its secret drawn here and answered once, only its
//! hash passed on), revoking one, and listing a tenant's keys a page at a time.

use tonic::Status;

use super::{Context, convert, holds, status::FieldError};
use crate::{
    auth,
    ledger::{ApiKeyId, Command, EnvironmentId, Outcome, TenantId, api_keys::ApiKeyView},
    proto,
};

/// Environments one key may list.
pub const MAX_API_KEY_ENVIRONMENTS: usize = 64;
/// The longest description of a key, in bytes.
pub const MAX_API_KEY_DESCRIPTION_BYTES: usize = 256;
/// Key ids drawn before giving up on finding a free one; 64 random bits make a second draw already
/// vanishingly rare.
const KEY_ID_DRAWS: usize = 3;

pub async fn create_api_key(context: &Context, request: proto::CreateApiKeyRequest) -> Result<proto::ApiKey, Status> {
    let tenant = convert::id("tenant_id", &request.tenant_id, TenantId::new)?;
    let environments = environment_ids(&request.environment_ids)?;
    let description = description(&request.description)?;
    let new_key = draw_key(context)?;
    let command =
        Command::CreateApiKey { id: new_key.id, tenant, environments, description, secret_hash: new_key.hash };
    let Outcome::ApiKey(view) = context.execute(&command).await? else { unreachable!("a creation yields a key") };
    tracing::info!(key_id = %view.id, environments = view.environments.len(), "API key created");
    Ok(api_key(view, new_key.secret))
}

pub async fn revoke_api_key(context: &Context, request: proto::RevokeApiKeyRequest) -> Result<proto::ApiKey, Status> {
    // An operator revoking a leaked key may paste its whole secret: the answer must not carry it back.
    if !auth::is_key_id(&request.key_id) {
        let problem = "is not a key id (16 lowercase hex characters): send the key's id, not its secret";
        return Err(FieldError::new("key_id", problem).into());
    }
    let id = convert::id("key_id", &request.key_id, ApiKeyId::new)?;
    let Outcome::ApiKey(view) = context.execute(&Command::RevokeApiKey { id }).await? else {
        unreachable!("a revocation yields a key")
    };
    tracing::info!(key_id = %view.id, open_reservations = view.open_reservations, "API key revoked");
    Ok(api_key(view, String::new()))
}

pub fn list_api_keys(
    context: &Context,
    request: proto::ListApiKeysRequest,
) -> Result<proto::ListApiKeysResponse, Status> {
    let tenant = convert::id("tenant_id", &request.tenant_id, TenantId::new)?;
    let page_size = holds::page_size(request.page_size)?;
    let after = page_start(&request.page_token)?;
    let page = context.ledger.api_keys(&tenant, after.as_ref(), page_size)?;
    Ok(proto::ListApiKeysResponse {
        api_keys: page.keys.into_iter().map(|view| api_key(view, String::new())).collect(),
        next_page_token: page.next_after.map(String::from).unwrap_or_default(),
    })
}

/// A key id and secret no key has; a taken id (never seen in practice) is drawn again.
fn draw_key(context: &Context) -> Result<auth::NewApiKey, Status> {
    for _ in 0..KEY_ID_DRAWS {
        let new_key = auth::new_api_key().map_err(|error| {
            tracing::error!(%error, "the operating system gave no random bytes for an API key");
            Status::unavailable("no random bytes are available to make an API key; retry")
        })?;
        if context.ledger.api_key(new_key.id.as_str()).is_none() {
            return Ok(new_key);
        }
    }
    Err(Status::unavailable("no free API key id was drawn; retry"))
}

/// At most [`MAX_API_KEY_ENVIRONMENTS`] valid ids, each named once.
fn environment_ids(ids: &[String]) -> Result<Vec<EnvironmentId>, FieldError> {
    if ids.len() > MAX_API_KEY_ENVIRONMENTS {
        return Err(FieldError::new(
            "environment_ids",
            format!("has {} ids; the limit is {MAX_API_KEY_ENVIRONMENTS}", ids.len()),
        ));
    }
    let mut parsed: Vec<EnvironmentId> = Vec::with_capacity(ids.len());
    for (index, id) in ids.iter().enumerate() {
        let field = format!("environment_ids[{index}]");
        let environment = convert::id(&field, id, EnvironmentId::new)?;
        if let Some(first) = parsed.iter().position(|seen| *seen == environment) {
            return Err(FieldError::new(field, format!("repeats environment_ids[{first}]")));
        }
        parsed.push(environment);
    }
    Ok(parsed)
}

fn description(text: &str) -> Result<String, FieldError> {
    if text.len() > MAX_API_KEY_DESCRIPTION_BYTES {
        return Err(FieldError::new(
            "description",
            format!("is {} bytes long; the limit is {MAX_API_KEY_DESCRIPTION_BYTES} bytes", text.len()),
        ));
    }
    if let Some(index) = text.char_indices().find(|(_, c)| c.is_control()).map(|(index, _)| index) {
        return Err(FieldError::new("description", format!("has a control character at byte {index}")));
    }
    Ok(text.to_owned())
}

/// The key a page starts after: the previous page's last key id.
fn page_start(token: &str) -> Result<Option<ApiKeyId>, FieldError> {
    if token.is_empty() {
        return Ok(None);
    }
    ApiKeyId::new(token).map(Some).map_err(|_| {
        FieldError::new(
            "page_token",
            "is not a token this server issued: pass the previous response's next_page_token, or nothing for \
             the first page",
        )
    })
}

fn api_key(view: ApiKeyView, secret: String) -> proto::ApiKey {
    proto::ApiKey {
        key_id: view.id.to_string(),
        secret,
        tenant_id: view.tenant.to_string(),
        environment_ids: view.environments.iter().map(ToString::to_string).collect(),
        description: view.description,
        created_at_unix_ms: view.created_at_ms,
        last_used_unix_ms: view.last_used_ms,
        open_reservations: view.open_reservations,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_id_count_limit_is_inclusive_and_repeats_are_refused() {
        let ids = |n: usize| (0..n).map(|i| format!("env-{i}")).collect::<Vec<_>>();
        assert_eq!(environment_ids(&ids(MAX_API_KEY_ENVIRONMENTS - 1)).unwrap().len(), 63);
        assert_eq!(environment_ids(&ids(MAX_API_KEY_ENVIRONMENTS)).unwrap().len(), 64);
        let error = environment_ids(&ids(MAX_API_KEY_ENVIRONMENTS + 1)).unwrap_err();
        assert_eq!(error.field, "environment_ids");
        assert!(error.description.contains("limit is 64"), "{error:?}");
        let error = environment_ids(&["a".into(), "b".into(), "a".into()]).unwrap_err();
        assert_eq!(
            (error.field.as_str(), error.description.as_str()),
            ("environment_ids[2]", "repeats environment_ids[0]")
        );
        assert_eq!(environment_ids(&["a".into(), String::new()]).unwrap_err().field, "environment_ids[1]");
    }

    #[test]
    fn description_length_limit_is_inclusive_and_control_characters_are_refused() {
        let max = MAX_API_KEY_DESCRIPTION_BYTES;
        assert!(description(&"d".repeat(max - 1)).is_ok());
        assert!(description(&"d".repeat(max)).is_ok());
        let error = description(&"d".repeat(max + 1)).unwrap_err();
        assert!(error.description.contains("limit is 256 bytes"), "{error:?}");
        assert!(description("sales runtime, eu-west — prod").is_ok());
        assert_eq!(description("line\nbreak").unwrap_err().description, "has a control character at byte 4");
    }
}

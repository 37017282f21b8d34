//! Credentials: API key secrets (drawing them, and reading one back from a request) and the admin
//! token. Only hashes are kept: the ledger stores the SHA-256 of each key's random part, and the
//! server the SHA-256 of the admin token, so every comparison is of two 32-byte hashes in constant time.
//!
//! A secret is `qk_<key id>_<secret>`: the key id is 16 lowercase hex characters (8 random bytes), the
//! secret 64 (32 random bytes). Embedding the id makes verification one lookup by id, one SHA-256 and
//! one comparison, with no allocation.

use std::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::ledger::{ApiKeyId, api_keys::SecretHash};

/// What every API key secret starts with, so that a secret is recognisable (in a leaked file, or in a
/// request that sends one where the admin token belongs).
pub const API_KEY_PREFIX: &str = "qk_";
const KEY_ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;
/// `qk_`, the hex key id, `_`, the hex secret.
pub const API_KEY_SECRET_LEN: usize = API_KEY_PREFIX.len() + 2 * KEY_ID_BYTES + 1 + 2 * SECRET_BYTES;
/// The shortest admin token accepted: 16 bytes of visible ASCII.
pub const MIN_ADMIN_TOKEN_BYTES: usize = 16;
/// The longest admin token accepted; it travels in a header with every admin call.
pub const MAX_ADMIN_TOKEN_BYTES: usize = 1_024;

const _: () = assert!(MIN_ADMIN_TOKEN_BYTES <= MAX_ADMIN_TOKEN_BYTES);

/// A key just drawn: its id, the secret to hand out once, and the hash to keep.
pub struct NewApiKey {
    pub id: ApiKeyId,
    pub secret: String,
    pub hash: SecretHash,
}

impl fmt::Debug for NewApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewApiKey").field("id", &self.id).finish_non_exhaustive()
    }
}

/// Draws a new key id and secret from the operating system's random source.
pub fn new_api_key() -> Result<NewApiKey, getrandom::Error> {
    let mut id_bytes = [0u8; KEY_ID_BYTES];
    let mut secret_bytes = [0u8; SECRET_BYTES];
    getrandom::fill(&mut id_bytes)?;
    getrandom::fill(&mut secret_bytes)?;
    let id_hex = hex(&id_bytes);
    let secret = format!("{API_KEY_PREFIX}{id_hex}_{}", hex(&secret_bytes));
    let id = ApiKeyId::new(&id_hex).expect("hex is a valid id");
    Ok(NewApiKey { id, secret, hash: secret_hash(&secret_bytes) })
}

/// An API key as a request presents it: the id to look up and the hash to compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresentedKey<'a> {
    pub id: &'a str,
    pub hash: SecretHash,
}

/// Reads `qk_<key id>_<secret>`; `None` for anything else.
pub fn parse_api_key(token: &str) -> Option<PresentedKey<'_>> {
    if token.len() != API_KEY_SECRET_LEN {
        return None;
    }
    let (id, secret_hex) = token.strip_prefix(API_KEY_PREFIX)?.split_once('_')?;
    if !is_key_id(id) {
        return None;
    }
    let mut secret = [0u8; SECRET_BYTES];
    unhex(secret_hex.as_bytes(), &mut secret)?;
    Some(PresentedKey { id, hash: secret_hash(&secret) })
}

/// The credential of an `authorization: Bearer <credential>` header value (the scheme in any case).
pub fn bearer_credential(header: &[u8]) -> Option<&str> {
    const SCHEME: &[u8] = b"bearer ";
    let (scheme, credential) = header.split_at_checked(SCHEME.len())?;
    if !scheme.eq_ignore_ascii_case(SCHEME) || credential.is_empty() {
        return None;
    }
    std::str::from_utf8(credential).ok()
}

/// A key id as a request sent it, for a log line. A key id is logged only in the form every key id
/// has (16 lowercase hex characters); a whole secret sent where its id belongs (`qk_<key id>_<secret>`,
/// say an operator revoking a leaked key by pasting it) is logged as its key id, and anything else by
/// its length alone, as it may be a secret or part of one.
pub struct LoggedKeyId<'a>(pub &'a str);

impl fmt::Display for LoggedKeyId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0;
        if is_key_id(text) {
            return f.write_str(text);
        }
        let id = text.strip_prefix(API_KEY_PREFIX).and_then(|rest| rest.split_once('_')).map(|(id, _)| id);
        match id.filter(|id| is_key_id(id)) {
            Some(id) => write!(f, "{API_KEY_PREFIX}{id}_<secret withheld>"),
            None => write!(f, "<{} bytes withheld: not a key id>", text.len()),
        }
    }
}

pub fn is_key_id(text: &str) -> bool {
    text.len() == 2 * KEY_ID_BYTES && text.bytes().all(is_lower_hex)
}

/// The admin token, kept as its SHA-256 hash.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken {
    hash: [u8; 32],
}

/// Why a configured admin token is refused. Never carries the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminTokenError {
    #[error("is empty")]
    Empty,
    #[error("is {len} bytes long; it must be {MIN_ADMIN_TOKEN_BYTES} to {MAX_ADMIN_TOKEN_BYTES} bytes")]
    Length { len: usize },
    #[error("has a character outside visible ASCII (0x21..=0x7E) at byte {index}")]
    NotVisibleAscii { index: usize },
    #[error("starts with {API_KEY_PREFIX:?}, which marks API keys")]
    LooksLikeAnApiKey,
}

impl AdminToken {
    /// A token as configured: surrounding whitespace (a file's last newline) is not part of it.
    pub fn new(text: &str) -> Result<Self, AdminTokenError> {
        let token = text.trim();
        if token.is_empty() {
            return Err(AdminTokenError::Empty);
        }
        if !(MIN_ADMIN_TOKEN_BYTES..=MAX_ADMIN_TOKEN_BYTES).contains(&token.len()) {
            return Err(AdminTokenError::Length { len: token.len() });
        }
        if let Some(index) = token.bytes().position(|b| !(0x21..=0x7E).contains(&b)) {
            return Err(AdminTokenError::NotVisibleAscii { index });
        }
        if token.starts_with(API_KEY_PREFIX) {
            return Err(AdminTokenError::LooksLikeAnApiKey);
        }
        Ok(Self { hash: Sha256::digest(token.as_bytes()).into() })
    }

    /// Whether `presented` is the token, in time that does not depend on where they differ.
    pub fn matches(&self, presented: &str) -> bool {
        let presented: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.hash.ct_eq(&presented).into()
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

fn secret_hash(secret: &[u8; SECRET_BYTES]) -> SecretHash {
    SecretHash(Sha256::digest(secret).into())
}

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes.iter().flat_map(|b| [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 0xf)]]).map(char::from).collect()
}

/// Decodes lowercase hex into `out`, which it must fill exactly.
fn unhex(text: &[u8], out: &mut [u8]) -> Option<()> {
    if text.len() != 2 * out.len() {
        return None;
    }
    let digit = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    };
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_id_is_logged_as_sent_and_a_secret_only_by_its_key_id() {
        let key = new_api_key().unwrap();
        let log = |text: &str| LoggedKeyId(text).to_string();
        assert_eq!(log(key.id.as_str()), key.id.as_str());
        assert_eq!(log(&key.secret), format!("qk_{}_<secret withheld>", key.id));
        let secret_part = &key.secret[API_KEY_PREFIX.len() + 2 * KEY_ID_BYTES + 1..];
        assert_eq!(log(secret_part), "<64 bytes withheld: not a key id>");
        assert_eq!(log(""), "<0 bytes withheld: not a key id>");
        assert_eq!(log("qk_x_y"), "<6 bytes withheld: not a key id>");
    }

    #[test]
    fn a_new_key_parses_back_to_its_id_and_hash() {
        let key = new_api_key().unwrap();
        assert_eq!(key.secret.len(), API_KEY_SECRET_LEN);
        let presented = parse_api_key(&key.secret).unwrap();
        assert_eq!(presented.id, key.id.as_str());
        assert!(presented.hash.matches(&key.hash));
        let other = new_api_key().unwrap();
        assert_ne!(other.id, key.id);
        assert!(!parse_api_key(&other.secret).unwrap().hash.matches(&key.hash));
    }

    #[test]
    fn malformed_keys_do_not_parse() {
        let key = new_api_key().unwrap().secret;
        let upper = key.to_uppercase().replacen("QK_", "qk_", 1);
        let wrong_prefix = key.replacen("qk_", "qx_", 1);
        let no_separator = key.replacen('_', "-", 2);
        for bad in [&key[..key.len() - 1], &format!("{key}0"), &upper, &wrong_prefix, &no_separator, "", "qk_"] {
            assert_eq!(parse_api_key(bad), None, "{bad}");
        }
        let non_hex = format!("{}g", &key[..key.len() - 1]);
        assert_eq!(parse_api_key(&non_hex), None);
    }

    #[test]
    fn bearer_credentials_are_read_with_any_case_of_scheme() {
        assert_eq!(bearer_credential(b"Bearer abc"), Some("abc"));
        assert_eq!(bearer_credential(b"bearer abc"), Some("abc"));
        assert_eq!(bearer_credential(b"Basic abc"), None);
        assert_eq!(bearer_credential(b"Bearer "), None);
        assert_eq!(bearer_credential(b"Bearer"), None);
    }

    #[test]
    fn admin_token_length_limits_are_inclusive_and_whitespace_is_trimmed() {
        let token = |n: usize| "t".repeat(n);
        assert_eq!(AdminToken::new(&token(15)), Err(AdminTokenError::Length { len: 15 }));
        assert!(AdminToken::new(&token(16)).is_ok());
        assert!(AdminToken::new(&token(17)).is_ok());
        assert!(AdminToken::new(&token(1_024)).is_ok());
        assert_eq!(AdminToken::new(&token(1_025)), Err(AdminTokenError::Length { len: 1_025 }));
        assert_eq!(AdminToken::new(" \n\t"), Err(AdminTokenError::Empty));
        assert_eq!(AdminToken::new("abcdefgh ijklmnop"), Err(AdminTokenError::NotVisibleAscii { index: 8 }));
        assert_eq!(AdminToken::new("qk_0123456789abcdef"), Err(AdminTokenError::LooksLikeAnApiKey));
        let configured = AdminToken::new("  0123456789abcdef\n").unwrap();
        assert!(configured.matches("0123456789abcdef"));
        assert!(!configured.matches("0123456789abcdeF"));
        assert!(!configured.matches("0123456789abcdef "));
        assert_eq!(format!("{configured:?}"), "AdminToken(..)");
    }
}

//! Key material. **A stored key exists in plaintext only in the response that creates it**: the
//! database and the caches hold its SHA-256.

use base64::Engine as _;

use crate::digest;

/// Random bytes in a key: 192 bits, above the 128 that make guessing hopeless.
const KEY_BYTES: usize = 24;

/// A new key: `sk-` and 32 URL-safe characters from the OS's random source.
pub fn generate_key() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; KEY_BYTES];
    getrandom::fill(&mut bytes)?;
    Ok(format!(
        "sk-{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

/// A random id for teams, users and key records: 128 bits, hex.
pub fn generate_id() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)?;
    Ok(digest::hex(&bytes))
}

/// The stored form of a key: SHA-256, lower-case hex (what LiteLLM calls the key's `token`).
pub fn hash_key(key: &str) -> String {
    digest::sha256_hex(key.as_bytes())
}

/// A key as the management routes take it: the plaintext, or its hash as returned by them.
pub fn token_of(key_or_hash: &str) -> String {
    let is_hash = key_or_hash.len() == 64
        && key_or_hash
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if is_hash {
        key_or_hash.to_owned()
    } else {
        hash_key(key_or_hash)
    }
}

/// What may be shown of a key after it was created: `sk-...` and its last four characters.
pub fn abbreviate(key: &str) -> String {
    let tail: String = key
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("sk-...{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_long_url_safe_and_distinct() {
        let a = generate_key().expect("random");
        let b = generate_key().expect("random");
        assert_ne!(a, b);
        assert!(a.starts_with("sk-") && a.len() == 35, "{a}");
        assert!(a[3..]
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
    }

    #[test]
    fn a_key_and_its_hash_name_the_same_token() {
        let key = "sk-abc";
        let token = hash_key(key);
        assert_eq!(token.len(), 64);
        assert_eq!(token_of(key), token);
        assert_eq!(token_of(&token), token);
        assert_eq!(abbreviate("sk-0123456789"), "sk-...6789");
    }
}

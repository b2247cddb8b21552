//! Bearer tokens for the TCP listener.

use std::fmt;

use hyper::header::{self, HeaderMap};

use crate::error::ApiError;

/// The secret every request over TCP must carry as `Authorization: Bearer <token>`. Its
/// `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken(String);

/// Shortest token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

/// A token that cannot be used; the message says why and what to use instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid API token: {0}; use at least {MIN_TOKEN_LEN} printable ASCII characters \
     without spaces, e.g. the output of `openssl rand -hex 32`"
)]
pub struct InvalidToken(&'static str);

impl BearerToken {
    pub fn new(token: impl Into<String>) -> Result<Self, InvalidToken> {
        let token = token.into();
        if token.len() < MIN_TOKEN_LEN {
            return Err(InvalidToken("it is too short"));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidToken(
                "it has a space or a character that is not printable ASCII",
            ));
        }
        Ok(Self(token))
    }

    /// Ok when `headers` hold exactly one `Authorization: Bearer <this token>` (the scheme's
    /// case does not matter), compared in time that depends only on the token's length.
    pub(crate) fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let mut values = headers.get_all(header::AUTHORIZATION).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return Err(ApiError::unauthorized());
        };
        let value = value.as_bytes();
        let Some(space) = value.iter().position(|&b| b == b' ') else {
            return Err(ApiError::unauthorized());
        };
        let (scheme, credentials) = value.split_at(space);
        if !scheme.eq_ignore_ascii_case(b"bearer")
            || !constant_time_eq(credentials.trim_ascii(), self.0.as_bytes())
        {
            return Err(ApiError::unauthorized());
        }
        Ok(())
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken(..)")
    }
}

/// Equality whose running time depends on `expected`'s length only, not on where `given`
/// first differs.
fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = u8::from(given.len() != expected.len());
    for (i, e) in expected.iter().enumerate() {
        diff |= e ^ given.get(i).copied().unwrap_or(0);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use hyper::header::HeaderValue;

    use super::*;

    const TOKEN: &str = "0123456789abcdef0123";

    fn check(values: &[&'static str]) -> bool {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(header::AUTHORIZATION, HeaderValue::from_static(v));
        }
        BearerToken::new(TOKEN).map(|t| t.check(&headers).is_ok()) == Ok(true)
    }

    #[test]
    fn only_the_exact_token_passes() {
        assert!(check(&["Bearer 0123456789abcdef0123"]));
        assert!(check(&["bearer 0123456789abcdef0123"]));
        assert!(!check(&[]));
        assert!(!check(&["Bearer"]));
        assert!(!check(&["Bearer "]));
        assert!(!check(&["Basic 0123456789abcdef0123"]));
        assert!(!check(&["Bearer 0123456789abcdef012"]));
        assert!(!check(&["Bearer 0123456789abcdef01234"]));
        assert!(!check(&["Bearer 0123456789abcdef0124"]));
        assert!(!check(&[
            "Bearer 0123456789abcdef0123",
            "Bearer 0123456789abcdef0123"
        ]));
    }

    #[test]
    fn weak_tokens_are_refused() {
        assert!(BearerToken::new("short").is_err());
        assert!(BearerToken::new("has a space in it, long enough").is_err());
        assert!(BearerToken::new("non-ascii-é-long-enough").is_err());
        let t = BearerToken::new(TOKEN).map(|t| format!("{t:?}"));
        assert_eq!(t.as_deref(), Ok("BearerToken(..)"));
    }
}

//! API-key authentication: `authorization: Bearer <key>` or `x-api-key: <key>`.
//!
//! The key is compared through BLAKE3 digests, whose equality check runs in constant
//! time, so the comparison leaks neither the key's content nor its length. The key is
//! never printed: its `Debug` is redacted.

use tonic::{Request, Status};

/// A secret API key.
#[derive(Clone)]
pub struct ApiKey {
    digest: blake3::Hash,
}

impl ApiKey {
    /// Wraps a key. `Error::InvalidArgument` when it is shorter than 16 bytes or holds
    /// characters that cannot travel in gRPC metadata.
    pub fn new(key: &str) -> crate::Result<Self> {
        let printable = key.bytes().all(|b| b.is_ascii_graphic());
        if key.len() < 16 || !printable {
            return Err(crate::Error::InvalidArgument {
                field: "api_key".into(),
                reason: "expected at least 16 visible ASCII characters".into(),
            });
        }
        Ok(Self {
            digest: blake3::hash(key.as_bytes()),
        })
    }

    /// True when `candidate` is the key.
    pub fn matches(&self, candidate: &str) -> bool {
        blake3::hash(candidate.as_bytes()) == self.digest
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Interceptor that admits a request only with the right key; with no key configured it
/// admits everything.
#[derive(Debug, Clone)]
pub struct Authenticator {
    key: Option<ApiKey>,
}

impl Authenticator {
    /// Checks requests against `key`, or admits all when `None`.
    pub fn new(key: Option<ApiKey>) -> Self {
        Self { key }
    }

    /// `UNAUTHENTICATED` when a key is configured and the request does not carry it.
    #[expect(
        clippy::result_large_err,
        reason = "tonic's interceptor contract returns Status by value"
    )]
    pub fn check<T>(&self, request: Request<T>) -> Result<Request<T>, Status> {
        let Some(key) = &self.key else {
            return Ok(request);
        };
        let metadata = request.metadata();
        let bearer = metadata
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(bearer_token);
        let header = metadata
            .get("x-api-key")
            .and_then(|value| value.to_str().ok());
        match bearer.or(header) {
            Some(candidate) if key.matches(candidate) => Ok(request),
            Some(_) => Err(Status::unauthenticated("invalid api key")),
            None => Err(Status::unauthenticated(
                "missing api key: send `authorization: Bearer <key>` or `x-api-key: <key>`",
            )),
        }
    }
}

impl tonic::service::Interceptor for Authenticator {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(request)
    }
}

/// The token of an `authorization` value whose scheme is `Bearer`, compared without regard
/// to case as HTTP schemes are.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "0123456789abcdef-secret";

    fn request(header: &'static str, value: &str) -> Request<()> {
        let mut request = Request::new(());
        let value = value.parse().expect("test values are valid metadata");
        request.metadata_mut().insert(header, value);
        request
    }

    #[test]
    fn accepts_bearer_and_header_and_rejects_wrong_or_missing_keys() {
        let auth = Authenticator::new(Some(ApiKey::new(KEY).expect("valid key")));
        assert!(auth
            .check(request("authorization", &format!("Bearer {KEY}")))
            .is_ok());
        assert!(auth.check(request("x-api-key", KEY)).is_ok());

        let wrong = auth.check(request("x-api-key", "0123456789abcdef-secreT"));
        assert_eq!(
            wrong.expect_err("wrong key").code(),
            tonic::Code::Unauthenticated
        );
        let missing = auth.check(Request::new(()));
        assert_eq!(
            missing.expect_err("no key").code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn the_bearer_scheme_is_matched_without_regard_to_case() {
        let auth = Authenticator::new(Some(ApiKey::new(KEY).expect("valid key")));
        for scheme in ["bearer", "BEARER", "Bearer"] {
            let header = format!("{scheme} {KEY}");
            assert!(
                auth.check(request("authorization", &header)).is_ok(),
                "{scheme}"
            );
        }
        assert!(auth.check(request("authorization", KEY)).is_err());
    }

    #[test]
    fn without_a_key_everything_is_admitted() {
        assert!(Authenticator::new(None).check(Request::new(())).is_ok());
    }

    #[test]
    fn debug_never_shows_the_key_and_short_keys_are_refused() {
        let key = ApiKey::new(KEY).expect("valid key");
        assert!(!format!("{key:?}").contains("secret"));
        assert!(ApiKey::new("short").is_err());
    }
}

//! Challenge-response authentication (DESIGN section 9): no secret on the wire.
//!
//! A client that holds the daemon's token first asks for a challenge; the daemon answers with a
//! fresh random nonce, kept for that connection; the client's hello then carries
//! HMAC-SHA256(token, nonce), which the daemon checks in constant time. A recorded handshake is
//! worthless: the next connection gets another nonce, and a nonce is spent by the hello that
//! follows it, right or wrong.

use std::io::{self, Read};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of a nonce and of a response.
pub const LEN: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// The token a text stands for: the text without its leading and trailing whitespace (spaces,
/// tabs, line ends: a token file's final newline, a pasted token's stray space); whitespace
/// inside it is part of it; its UTF-8 bytes are the HMAC key. The one home of that rule: the
/// daemon applies it to its token file, a client to the token it is given, so the two agree
/// however each was written.
pub fn token_of(text: &str) -> &str {
    text.trim()
}

fn mac(token: &str) -> HmacSha256 {
    HmacSha256::new_from_slice(token_of(token).as_bytes()).expect("HMAC takes a key of any length")
}

/// A fresh nonce from the kernel's random source.
pub fn nonce() -> io::Result<[u8; LEN]> {
    let mut n = [0u8; LEN];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut n)?;
    Ok(n)
}

/// The client's response to `nonce`: HMAC-SHA256 keyed by `token`.
pub fn respond(token: &str, nonce: &[u8; LEN]) -> [u8; LEN] {
    let mut m = mac(token);
    m.update(nonce);
    m.finalize().into_bytes().into()
}

/// Whether `response` answers `nonce` for `token` (compared in constant time).
pub fn verify(token: &str, nonce: &[u8; LEN], response: &[u8; LEN]) -> bool {
    let mut m = mac(token);
    m.update(nonce);
    m.verify_slice(response).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_verifies_for_its_token_and_nonce_only() {
        let (a, b) = (nonce().unwrap(), nonce().unwrap());
        assert_ne!(a, b);
        let r = respond("secret", &a);
        assert!(verify("secret", &a, &r));
        assert!(!verify("secret", &b, &r), "another nonce");
        assert!(!verify("Secret", &a, &r), "another token");
        // Leading and trailing whitespace is not part of a token; inner whitespace is.
        assert!(verify("  secret\n", &a, &r), "a token file's newline");
        assert!(verify("secret", &a, &respond("\tsecret \r\n", &a)));
        assert!(!verify("sec ret", &a, &r), "inner whitespace counts");
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let mut m = mac("Jefe");
        m.update(b"what do ya want for nothing?");
        let hex: String = m
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}

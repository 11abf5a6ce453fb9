//! SMTP AUTH (RFC 4954) with PLAIN (RFC 4616) and LOGIN, on submission
//! listeners, under TLS only. Passwords are checked against argon2 hashes
//! from `[smtp.users]`; `skeind hash-password` makes them.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use tokio::io::{AsyncRead, AsyncWrite};

use super::replies;
use super::session::{Flow, Session};

/// RFC 4954 §4: a SASL response line may be 12288 octets.
const MAX_SASL_LINE: usize = 12_288 + 2;

/// A hash of a password that matches nothing, checked for unknown users so
/// that a wrong name takes as long as a wrong password.
const DECOY: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2tlaW4tZGVjb3ktc2FsdA$YY1hWkuX3dWZqT6c7bSCqhsOt4FqwNeRqzoevKfJIDI";

/// Make an argon2id hash (PHC string) of `password` for `[smtp.users]`.
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    let salt: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt).map_err(|e| anyhow::anyhow!("{e}"))?;
    let hash = Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(hash.to_string())
}

/// Check a name and password against the configured users (slow on purpose).
fn verify(users: &std::collections::BTreeMap<String, String>, user: &str, password: &str) -> bool {
    let hash = users.get(user).map(String::as_str).unwrap_or(DECOY);
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    let ok = Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok();
    ok && users.contains_key(user)
}

enum Sasl {
    Line(String),
    Aborted,
    Gone,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<'_, S> {
    pub(super) async fn auth(
        &mut self,
        mechanism: &str,
        initial: Option<String>,
    ) -> std::io::Result<Flow> {
        if !self.ctx.require_auth {
            self.reply(replies::auth_not_here());
            return Ok(Flow::Continue);
        }
        if !self.tls {
            self.reply(replies::encryption_required());
            return Ok(Flow::Continue);
        }
        if self.helo.is_none() {
            self.reply(replies::need_helo());
            return Ok(Flow::Continue);
        }
        if self.user.is_some() {
            self.reply(replies::already_authenticated());
            return Ok(Flow::Continue);
        }
        if self.tx.is_some() {
            self.reply(replies::auth_in_transaction());
            return Ok(Flow::Continue);
        }
        let credentials = match mechanism {
            "PLAIN" => {
                let response = match initial {
                    Some(s) => Sasl::Line(s),
                    None => self.sasl_exchange("").await?,
                };
                match response {
                    Sasl::Line(s) => Some(decode(&s).map(|b| plain(&b))),
                    Sasl::Aborted => None,
                    Sasl::Gone => return Ok(Flow::Close),
                }
            }
            "LOGIN" => {
                let user = match initial {
                    Some(s) => Sasl::Line(s),
                    // "Username:" and "Password:", base64, as every client expects.
                    None => self.sasl_exchange("VXNlcm5hbWU6").await?,
                };
                let user = match user {
                    Sasl::Line(s) => decode(&s),
                    Sasl::Aborted => return self.aborted(),
                    Sasl::Gone => return Ok(Flow::Close),
                };
                match self.sasl_exchange("UGFzc3dvcmQ6").await? {
                    Sasl::Line(s) => {
                        Some(user.and_then(|u| decode(&s).map(|p| Some((utf8(u)?, utf8(p)?)))))
                    }
                    Sasl::Aborted => None,
                    Sasl::Gone => return Ok(Flow::Close),
                }
            }
            _ => {
                self.reply(replies::unknown_mechanism());
                return Ok(Flow::Continue);
            }
        };
        let (user, password) = match credentials {
            None => return self.aborted(),
            Some(None) => {
                self.reply(replies::undecodable_sasl());
                return Ok(Flow::Continue);
            }
            Some(Some(None)) => {
                self.reply(replies::auth_failed());
                return Ok(Flow::Continue);
            }
            Some(Some(Some(c))) => c,
        };
        let users = self.ctx.users.clone();
        let check_user = user.clone();
        let ok = tokio::task::spawn_blocking(move || verify(&users, &check_user, &password))
            .await
            .unwrap_or(false);
        if ok {
            tracing::info!(client = %self.peer, user = %user, "authenticated");
            self.user = Some(user);
            self.reply(replies::auth_ok());
        } else {
            tracing::warn!(client = %self.peer, user = %user, "authentication failed");
            self.reply(replies::auth_failed());
        }
        Ok(Flow::Continue)
    }

    fn aborted(&mut self) -> std::io::Result<Flow> {
        self.reply(replies::auth_aborted());
        Ok(Flow::Continue)
    }

    /// Send a 334 challenge and read the client's response line.
    async fn sasl_exchange(&mut self, challenge: &str) -> std::io::Result<Sasl> {
        self.reply(replies::sasl_challenge(challenge));
        match self.next_line(MAX_SASL_LINE).await? {
            None => Ok(Sasl::Gone),
            Some(line) if line == b"*" => Ok(Sasl::Aborted),
            Some(line) => Ok(Sasl::Line(String::from_utf8_lossy(&line).into_owned())),
        }
    }
}

/// Base64, where "=" stands for an empty response.
fn decode(s: &str) -> Option<Vec<u8>> {
    if s == "=" {
        return Some(Vec::new());
    }
    B64.decode(s.trim()).ok()
}

fn utf8(b: Vec<u8>) -> Option<String> {
    String::from_utf8(b).ok()
}

/// PLAIN: authzid NUL authcid NUL passwd. An authzid other than the
/// authcid (acting for another user) is not allowed.
fn plain(b: &[u8]) -> Option<(String, String)> {
    let mut parts = b.split(|&c| c == 0);
    let (authz, authc, pass) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || authc.is_empty() || (!authz.is_empty() && authz != authc) {
        return None;
    }
    Some((utf8(authc.to_vec())?, utf8(pass.to_vec())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_and_the_decoy_never_does() {
        let h = hash_password("s3cret").unwrap();
        let users = [("alice".to_string(), h)].into_iter().collect();
        assert!(verify(&users, "alice", "s3cret"));
        assert!(!verify(&users, "alice", "wrong"));
        assert!(!verify(&users, "bob", "s3cret"));
        assert!(PasswordHash::new(DECOY).is_ok());
    }

    #[test]
    fn plain_responses() {
        assert_eq!(plain(b"\0alice\0pw"), Some(("alice".into(), "pw".into())));
        assert_eq!(
            plain(b"alice\0alice\0pw"),
            Some(("alice".into(), "pw".into()))
        );
        assert_eq!(plain(b"bob\0alice\0pw"), None);
        assert_eq!(plain(b"\0\0pw"), None);
        assert_eq!(plain(b"alice"), None);
    }
}

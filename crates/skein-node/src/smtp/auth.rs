//! SMTP AUTH (RFC 4954) with PLAIN (RFC 4616) and LOGIN, on submission
//! listeners, under TLS only. Passwords are checked against argon2 hashes
//! from `[smtp.users]`; `skeind hash-password` makes them.
//!
//! argon2 is slow on purpose, which makes password checks a way to burn a
//! node's CPU: the [`Authenticator`] runs at most a few at once (a check
//! that cannot start within [`CHECK_WAIT`] is answered `454 4.7.0`), and an
//! address whose checks keep failing waits longer before each answer, up
//! to [`MAX_PENALTY`].

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use skein_smtp::Escaped;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;

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

/// Longest a password check waits for its turn.
pub const CHECK_WAIT: Duration = Duration::from_secs(10);
/// The longest wait imposed on an address that keeps failing.
pub const MAX_PENALTY: Duration = Duration::from_secs(16);
/// How long failures from an address are remembered.
const FAILURE_MEMORY: Duration = Duration::from_secs(15 * 60);
/// Addresses remembered at most; past this the oldest are forgotten.
const MAX_REMEMBERED: usize = 10_000;

/// The configured users, and the limits on checking their passwords.
pub struct Authenticator {
    users: std::sync::Arc<BTreeMap<String, String>>,
    slots: Semaphore,
    wait: Duration,
    /// Per client address: failures in a row, and the last one.
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

/// No password check could start in time.
#[derive(Debug)]
pub struct Busy;

impl Authenticator {
    /// At most one check per core runs at once.
    pub fn new(users: BTreeMap<String, String>) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self::with_limits(users, cores, CHECK_WAIT)
    }

    pub fn with_limits(users: BTreeMap<String, String>, at_once: usize, wait: Duration) -> Self {
        Authenticator {
            users: std::sync::Arc::new(users),
            slots: Semaphore::new(at_once.max(1)),
            wait,
            failures: Mutex::new(HashMap::new()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// How long to hold an answer for `client`: nothing at first, then 1 s,
    /// doubling with each failure in a row, up to [`MAX_PENALTY`].
    pub fn penalty(&self, client: IpAddr, now: Instant) -> Duration {
        let f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        match f.get(&client.to_canonical()) {
            Some((n, last)) if now.duration_since(*last) < FAILURE_MEMORY && *n > 0 => {
                Duration::from_secs(1u64 << (n - 1).min(4)).min(MAX_PENALTY)
            }
            _ => Duration::ZERO,
        }
    }

    fn record(&self, client: IpAddr, ok: bool, now: Instant) {
        let client = client.to_canonical();
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if ok {
            f.remove(&client);
            return;
        }
        if f.len() >= MAX_REMEMBERED && !f.contains_key(&client) {
            f.retain(|_, (_, last)| now.duration_since(*last) < FAILURE_MEMORY);
            if f.len() >= MAX_REMEMBERED {
                if let Some(oldest) = f.iter().min_by_key(|(_, (_, t))| *t).map(|(ip, _)| *ip) {
                    f.remove(&oldest);
                }
            }
        }
        let e = f.entry(client).or_insert((0, now));
        if now.duration_since(e.1) >= FAILURE_MEMORY {
            e.0 = 0;
        }
        e.0 = e.0.saturating_add(1);
        e.1 = now;
    }

    /// Check `user`'s password for a session from `client`: after this
    /// address's penalty, within the limit of checks running at once.
    pub async fn check(&self, client: IpAddr, user: &str, password: String) -> Result<bool, Busy> {
        let penalty = self.penalty(client, Instant::now());
        if !penalty.is_zero() {
            tokio::time::sleep(penalty).await;
        }
        let _permit = tokio::time::timeout(self.wait, self.slots.acquire())
            .await
            .map_err(|_| Busy)?
            .map_err(|_| Busy)?;
        let users = self.users.clone();
        let user_owned = user.to_string();
        let ok = tokio::task::spawn_blocking(move || verify(&users, &user_owned, &password))
            .await
            .unwrap_or(false);
        self.record(client, ok, Instant::now());
        Ok(ok)
    }
}

/// Check a name and password against the configured users (slow on purpose).
fn verify(users: &BTreeMap<String, String>, user: &str, password: &str) -> bool {
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
        let ok = match self.ctx.auth.check(self.peer.ip(), &user, password).await {
            Ok(ok) => ok,
            Err(Busy) => {
                tracing::warn!(client = %self.peer, user = %Escaped(&user), "authentication not checked: too many checks waiting");
                self.reply(replies::auth_busy());
                return Ok(Flow::Continue);
            }
        };
        if ok {
            tracing::info!(client = %self.peer, user = %Escaped(&user), "authenticated");
            self.user = Some(user);
            self.reply(replies::auth_ok());
        } else {
            tracing::warn!(client = %self.peer, user = %Escaped(&user), "authentication failed");
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
    fn failures_from_an_address_slow_it_down_and_a_success_forgives() {
        let a = Authenticator::new(BTreeMap::new());
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        let t = Instant::now();
        assert_eq!(a.penalty(ip, t), Duration::ZERO);
        let mut seen = Vec::new();
        for _ in 0..7 {
            a.record(ip, false, t);
            seen.push(a.penalty(ip, t).as_secs());
        }
        assert_eq!(seen, [1, 2, 4, 8, 16, 16, 16]);
        assert_eq!(a.penalty(other, t), Duration::ZERO, "per address");
        assert_eq!(
            a.penalty(ip, t + FAILURE_MEMORY),
            Duration::ZERO,
            "forgotten after a while"
        );
        a.record(ip, true, t);
        assert_eq!(a.penalty(ip, t), Duration::ZERO);
        // IPv4-mapped is the same address.
        a.record("::ffff:192.0.2.8".parse().unwrap(), false, t);
        assert_eq!(a.penalty(other, t), Duration::from_secs(1));
    }

    #[test]
    fn remembered_addresses_are_bounded() {
        let a = Authenticator::new(BTreeMap::new());
        let t = Instant::now();
        for i in 0..(MAX_REMEMBERED as u32 + 50) {
            a.record(
                IpAddr::from(i.to_be_bytes()),
                false,
                t + Duration::from_millis(i as u64),
            );
        }
        assert!(a.failures.lock().unwrap().len() <= MAX_REMEMBERED);
    }

    #[tokio::test]
    async fn checks_beyond_the_limit_wait_and_then_give_up() {
        let h = hash_password("pw").unwrap();
        let users: BTreeMap<_, _> = [("alice".to_string(), h)].into_iter().collect();
        let a = Authenticator::with_limits(users, 1, Duration::from_millis(50));
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let held = a.slots.acquire().await.unwrap();
        assert!(a.check(ip, "alice", "pw".into()).await.is_err(), "busy");
        drop(held);
        assert!(a.check(ip, "alice", "pw".into()).await.unwrap());
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

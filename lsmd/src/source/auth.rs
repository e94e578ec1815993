//! Registry authentication (the distribution token spec): a request answered 401 carries a
//! `WWW-Authenticate` challenge; `Basic` means send the credentials, `Bearer realm=…,service=…,
//! scope=…` means fetch a token from `realm` (with the credentials, if any) and send that. Tokens
//! are kept until they expire (`expires_in`, default 60 s, at most a day) or the registry
//! refuses them.
//!
//! Credentials go only where they belong: Basic credentials are sent to the registry itself, and
//! to a token realm only on the registry's host, a mirror's or a configured `token_hosts` entry
//! (a challenge can name any URL as its realm); never over plain `http://` to a host that is not
//! loopback. A realm that may not have them is asked for an anonymous token.

use std::collections::HashMap;
use std::io::Read;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::redact;

/// Username and password for a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <password>)", self.username)
    }
}

impl Credentials {
    /// `Basic …` header value.
    pub fn basic(&self) -> String {
        format!(
            "Basic {}",
            base64_encode(format!("{}:{}", self.username, self.password).as_bytes())
        )
    }

    /// Credentials for `host` (`host[:port]`) from a docker-style `config.json`
    /// (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`): `auths.<host>.auth` is
    /// base64 of `user:password`.
    pub fn from_docker_config(host: &str) -> Option<Credentials> {
        let dir = std::env::var_os("DOCKER_CONFIG")
            .map(std::path::PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".docker"))
            })?;
        let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
        Credentials::from_docker_config_text(&text, host)
    }

    /// [`Self::from_docker_config`] on the file's text.
    pub fn from_docker_config_text(text: &str, host: &str) -> Option<Credentials> {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        let auths = v.get("auths")?.as_object()?;
        let entry = auths.iter().find_map(|(k, e)| {
            let k = k
                .trim_start_matches("https://")
                .trim_start_matches("http://");
            (k.split('/').next() == Some(host)).then_some(e)
        })?;
        let raw = base64_decode(entry.get("auth")?.as_str()?)?;
        let s = String::from_utf8(raw).ok()?;
        let (u, p) = s.split_once(':')?;
        Some(Credentials {
            username: u.to_string(),
            password: p.to_string(),
        })
    }
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        params: Vec<(String, String)>,
    },
}

/// Parses `Basic realm="x"` or `Bearer realm="…",service="…",scope="…"`.
pub fn parse_challenge(h: &str) -> Option<Challenge> {
    let h = h.trim();
    let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
    let mut params = Vec::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let (k, r) = rest.split_once('=')?;
        let r = r.trim_start();
        let (v, r) = if let Some(r) = r.strip_prefix('"') {
            let end = r.find('"')?;
            (&r[..end], &r[end + 1..])
        } else {
            let end = r.find(',').unwrap_or(r.len());
            (&r[..end], &r[end..])
        };
        params.push((k.trim().to_ascii_lowercase(), v.to_string()));
        rest = r.trim_start().trim_start_matches(',').trim_start();
    }
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Some(Challenge::Basic),
        "bearer" => {
            let realm = params.iter().find(|(k, _)| k == "realm")?.1.clone();
            params.retain(|(k, _)| k != "realm");
            Some(Challenge::Bearer { realm, params })
        }
        _ => None,
    }
}

struct Token {
    value: String,
    expires: Instant,
}

/// Authorization state for one registry: credentials, the last challenge, a cached token.
pub struct RegistryAuth {
    creds: Option<Credentials>,
    /// The registry's base URL (where Basic credentials go), empty if unknown.
    base: String,
    /// Hosts (`host[:port]`) a token realm may be on to receive the credentials.
    credential_hosts: Vec<String>,
    state: Mutex<(Option<Challenge>, Option<Token>)>,
    /// Tokens fetched so far (the tests watch refreshes).
    pub tokens_fetched: std::sync::atomic::AtomicU64,
}

impl RegistryAuth {
    /// Auth for the server at `base`: credentials go to it and, when a Bearer challenge names a
    /// realm on one of `credential_hosts` (or `base`'s host), to that realm.
    pub fn new(
        creds: Option<Credentials>,
        base: &str,
        credential_hosts: &[String],
    ) -> RegistryAuth {
        let mut hosts = credential_hosts.to_vec();
        if !base.is_empty() {
            hosts.push(redact::host_of(base));
        }
        RegistryAuth {
            creds,
            base: base.to_string(),
            credential_hosts: hosts,
            state: Mutex::new((None, None)),
            tokens_fetched: Default::default(),
        }
    }

    /// The `Authorization` value to send now, if the registry asked for one before.
    pub fn header(&self, agent: &ureq::Agent) -> Result<Option<String>, String> {
        let (challenge, fresh) = {
            let st = self.state.lock();
            let fresh =
                st.1.as_ref()
                    .filter(|t| Instant::now() < t.expires)
                    .map(|t| format!("Bearer {}", t.value));
            (st.0.clone(), fresh)
        };
        match challenge {
            None => Ok(None),
            // (`challenged` accepted Basic only with credentials it may send here)
            Some(Challenge::Basic) => Ok(self.creds.as_ref().map(Credentials::basic)),
            Some(Challenge::Bearer { realm, params }) => match fresh {
                Some(h) => Ok(Some(h)),
                None => self.fetch_token(agent, &realm, &params).map(Some),
            },
        }
    }

    /// Records a 401's challenge and drops the cached token; `Err(why)` if it cannot be met.
    pub fn challenged(&self, www_authenticate: Option<&str>) -> Result<(), String> {
        let Some(c) = www_authenticate.and_then(parse_challenge) else {
            return Err("no challenge this client can answer".into());
        };
        if c == Challenge::Basic {
            match &self.creds {
                None => return Err("no usable credentials".into()),
                Some(_) if cleartext_to_remote(&self.base) => {
                    return Err(format!(
                        "credentials are never sent over plain HTTP to {}, which is not loopback",
                        redact::url(&self.base)
                    ))
                }
                Some(_) => {}
            }
        }
        let mut st = self.state.lock();
        st.0 = Some(c);
        st.1 = None;
        Ok(())
    }

    /// Whether a token realm may receive the credentials; `Err(why not)` otherwise.
    fn may_send_credentials_to(&self, realm: &str) -> Result<(), &'static str> {
        if !self.credential_hosts.contains(&redact::host_of(realm)) {
            return Err("is on another host than the registry, its mirrors and `token_hosts`");
        }
        if cleartext_to_remote(realm) {
            return Err("is plain HTTP to a host that is not loopback");
        }
        Ok(())
    }

    fn fetch_token(
        &self,
        agent: &ureq::Agent,
        realm: &str,
        params: &[(String, String)],
    ) -> Result<String, String> {
        let mut req = agent.get(realm);
        for (k, v) in params {
            req = req.query(k, v);
        }
        let shown = redact::url(realm);
        if let Some(c) = &self.creds {
            match self.may_send_credentials_to(realm) {
                Ok(()) => req = req.set("Authorization", &c.basic()),
                Err(why) => {
                    tracing::warn!(realm = %shown, "token realm {why}: asking it for an anonymous token, credentials withheld")
                }
            }
        }
        let resp = req
            .call()
            .map_err(|e| format!("token request to {shown}: {}", redact::text(&e.to_string())))?;
        let mut text = String::new();
        resp.into_reader()
            .take(1 << 20)
            .read_to_string(&mut text)
            .map_err(|e| format!("token response from {shown}: {e}"))?;
        let body: HashMap<String, serde_json::Value> = serde_json::from_str(&text)
            .map_err(|e| format!("token response from {shown}: not JSON ({e})"))?;
        let value = ["token", "access_token"]
            .iter()
            .find_map(|k| body.get(*k).and_then(|v| v.as_str()))
            .ok_or_else(|| format!("token response from {shown} has no token"))?
            .to_string();
        // Renew a little early, so a token never expires between check and use.
        let life = token_life(body.get("expires_in")).saturating_sub(Duration::from_millis(500));
        self.tokens_fetched
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.state.lock().1 = Some(Token {
            value: value.clone(),
            expires: Instant::now() + life,
        });
        Ok(format!("Bearer {value}"))
    }
}

/// How long a token lives, from its `expires_in` (seconds, any JSON number): 60 s when absent,
/// not a positive finite number, or not a number; at most a day.
fn token_life(expires_in: Option<&serde_json::Value>) -> Duration {
    const MAX: f64 = 86_400.0;
    match expires_in.and_then(|v| v.as_f64()) {
        Some(s) if s.is_finite() && s > 0.0 => Duration::from_secs_f64(s.clamp(1.0, MAX)),
        _ => Duration::from_secs(60),
    }
}

/// True when `url` is plain `http://` to a host that is not loopback: credentials would cross a
/// network in clear text.
fn cleartext_to_remote(url: &str) -> bool {
    url.starts_with("http://") && !redact::is_loopback(url)
}

/// Auth state shared by every blob of one registry repository (tokens are scoped to it), so a
/// token fetched for one layer serves the others. Cloning shares it.
#[derive(Clone, Default)]
pub struct AuthCache(std::sync::Arc<Mutex<HashMap<String, std::sync::Arc<RegistryAuth>>>>);

impl AuthCache {
    /// The state for `repository` at `base` (a registry's base URL), made with `creds` and
    /// `credential_hosts` the first time.
    pub fn get(
        &self,
        base: &str,
        repository: &str,
        creds: Option<Credentials>,
        credential_hosts: &[String],
    ) -> std::sync::Arc<RegistryAuth> {
        self.0
            .lock()
            .entry(format!("{base}/{repository}"))
            .or_insert_with(|| {
                std::sync::Arc::new(RegistryAuth::new(creds, base, credential_hosts))
            })
            .clone()
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard base64 (padding optional); `None` on anything else.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for ch in s.bytes() {
        let v = B64.iter().position(|&b| b == ch)? as u32;
        acc = acc << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn challenges_parse() {
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="http://127.0.0.1:9/token",service="reg",scope="repository:a/b:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "http://127.0.0.1:9/token".into(),
                params: vec![
                    ("service".into(), "reg".into()),
                    ("scope".into(), "repository:a/b:pull".into())
                ]
            })
        );
        assert_eq!(parse_challenge("Negotiate abc"), None);
    }

    #[test]
    fn token_lifetimes_are_bounded() {
        let life = |v: serde_json::Value| token_life(Some(&v));
        assert_eq!(life(serde_json::json!(300)), Duration::from_secs(300));
        assert_eq!(life(serde_json::json!(1e30)), Duration::from_secs(86_400));
        assert_eq!(
            life(serde_json::json!(u64::MAX)),
            Duration::from_secs(86_400)
        );
        assert_eq!(life(serde_json::json!(-5)), Duration::from_secs(60));
        assert_eq!(life(serde_json::json!("10")), Duration::from_secs(60));
        assert_eq!(token_life(None), Duration::from_secs(60));
        // (NaN is not JSON; a serde_json Number cannot hold it.)
        assert!(Instant::now()
            .checked_add(life(serde_json::json!(1e300)))
            .is_some());
    }

    #[test]
    fn credentials_never_go_in_clear_to_a_remote_host() {
        let creds = Some(Credentials {
            username: "u".into(),
            password: "p".into(),
        });
        let remote = RegistryAuth::new(creds.clone(), "http://10.1.2.3:5000", &[]);
        let e = remote
            .challenged(Some(r#"Basic realm="r""#))
            .expect_err("Basic over plain HTTP to a remote host");
        assert!(e.contains("plain HTTP"), "{e}");
        for ok in [
            "https://10.1.2.3:5000",
            "http://127.0.0.1:5000",
            "http://localhost",
        ] {
            let a = RegistryAuth::new(creds.clone(), ok, &[]);
            assert!(a.challenged(Some(r#"Basic realm="r""#)).is_ok(), "{ok}");
        }
        // Token realms: only on the registry's host or a listed one, never in clear to a
        // remote host.
        let reg = RegistryAuth::new(creds, "https://reg.example:5000", &["auth.example".into()]);
        assert!(reg
            .may_send_credentials_to("https://reg.example:5000/token")
            .is_ok());
        assert!(reg
            .may_send_credentials_to("https://auth.example/token")
            .is_ok());
        assert!(reg
            .may_send_credentials_to("http://auth.example/token")
            .is_err());
        assert!(reg
            .may_send_credentials_to("https://evil.example/token")
            .is_err());
        assert!(reg
            .may_send_credentials_to("https://reg.example:5001/token")
            .is_err());
        assert!(cleartext_to_remote("http://10.0.0.1/token"));
        assert!(!cleartext_to_remote("https://10.0.0.1/token"));
        assert!(!cleartext_to_remote("http://127.0.0.2:9/token"));
    }

    #[test]
    fn docker_config_credentials() {
        let text = r#"{"auths": {"https://127.0.0.1:5000": {"auth": "dXNlcjpwYXNzOndvcmQ="}}}"#;
        let c = Credentials::from_docker_config_text(text, "127.0.0.1:5000").expect("creds");
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("user", "pass:word")
        );
        assert!(Credentials::from_docker_config_text(text, "other:5000").is_none());
    }

    proptest! {
        /// Fuzz: base64 round-trips; challenge and base64 parsers never panic.
        #[test]
        fn parsers(data in proptest::collection::vec(any::<u8>(), 0..100), junk in ".{0,120}") {
            prop_assert_eq!(base64_decode(&base64_encode(&data)), Some(data));
            let _ = parse_challenge(&junk);
            let _ = base64_decode(&junk);
            let _ = Credentials::from_docker_config_text(&junk, "h");
        }
    }
}

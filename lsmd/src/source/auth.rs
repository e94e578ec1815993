//! Registry authentication (the distribution token spec): a request answered 401 carries a
//! `WWW-Authenticate` challenge; `Basic` means send the credentials, `Bearer realm=…,service=…,
//! scope=…` means fetch a token from `realm` (with the credentials, if any) and send that. Tokens
//! are kept until they expire (`expires_in`, default 60 s) or the registry refuses them.

use std::collections::HashMap;
use std::io::Read;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

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
    state: Mutex<(Option<Challenge>, Option<Token>)>,
    /// Tokens fetched so far (the tests watch refreshes).
    pub tokens_fetched: std::sync::atomic::AtomicU64,
}

impl RegistryAuth {
    pub fn new(creds: Option<Credentials>) -> RegistryAuth {
        RegistryAuth {
            creds,
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
            Some(Challenge::Basic) => Ok(self.creds.as_ref().map(Credentials::basic)),
            Some(Challenge::Bearer { realm, params }) => match fresh {
                Some(h) => Ok(Some(h)),
                None => self.fetch_token(agent, &realm, &params).map(Some),
            },
        }
    }

    /// Records a 401's challenge and drops the cached token; `false` if it cannot be met.
    pub fn challenged(&self, www_authenticate: Option<&str>) -> bool {
        let Some(c) = www_authenticate.and_then(parse_challenge) else {
            return false;
        };
        let mut st = self.state.lock();
        if c == Challenge::Basic && self.creds.is_none() {
            return false;
        }
        st.0 = Some(c);
        st.1 = None;
        true
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
        if let Some(c) = &self.creds {
            req = req.set("Authorization", &c.basic());
        }
        let resp = req
            .call()
            .map_err(|e| format!("token request to {realm}: {e}"))?;
        let mut text = String::new();
        resp.into_reader()
            .take(1 << 20)
            .read_to_string(&mut text)
            .map_err(|e| format!("token response from {realm}: {e}"))?;
        let body: HashMap<String, serde_json::Value> =
            serde_json::from_str(&text).map_err(|e| format!("token response from {realm}: {e}"))?;
        let value = ["token", "access_token"]
            .iter()
            .find_map(|k| body.get(*k).and_then(|v| v.as_str()))
            .ok_or_else(|| format!("token response from {realm} has no token"))?
            .to_string();
        let ttl = body
            .get("expires_in")
            .and_then(|v| v.as_u64())
            .unwrap_or(60)
            .max(1);
        // Renew a little early, so a token never expires between check and use.
        let life = Duration::from_secs(ttl).saturating_sub(Duration::from_millis(500));
        self.tokens_fetched
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.state.lock().1 = Some(Token {
            value: value.clone(),
            expires: Instant::now() + life,
        });
        Ok(format!("Bearer {value}"))
    }
}

/// Auth state shared by every blob of one registry repository (tokens are scoped to it), so a
/// token fetched for one layer serves the others. Cloning shares it.
#[derive(Clone, Default)]
pub struct AuthCache(std::sync::Arc<Mutex<HashMap<String, std::sync::Arc<RegistryAuth>>>>);

impl AuthCache {
    /// The state for `key` (registry base URL + repository), made with `creds` the first time.
    pub fn get(&self, key: &str, creds: Option<Credentials>) -> std::sync::Arc<RegistryAuth> {
        self.0
            .lock()
            .entry(key.to_string())
            .or_insert_with(|| std::sync::Arc::new(RegistryAuth::new(creds)))
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

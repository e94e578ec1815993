//! A real OCI registry for the tests: Debian's `docker-registry` (CNCF distribution) on
//! 127.0.0.1, optionally behind htpasswd basic auth, optionally over HTTPS with a certificate of
//! a test CA made here with openssl (trusted by lsm through `ca_file` / `--registry-ca`, never
//! through the system store), with blobs pushed by plain uploads.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::nbd::free_port;
use crate::ok;

/// A running registry; killed when dropped.
pub struct Registry {
    child: Option<Child>,
    dir: PathBuf,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// Basic-auth user and password, if enabled.
    pub auth: Option<(String, String)>,
    /// The test CA's certificate (PEM) when serving HTTPS.
    pub ca: Option<PathBuf>,
}

/// Makes a test CA under `dir` and a server certificate it signs for 127.0.0.1 and localhost;
/// returns (CA certificate, server certificate, server key), all PEM.
pub fn make_test_ca(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).expect("ca dir");
    let (ca, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let (crt, key, csr) = (
        dir.join("server.pem"),
        dir.join("server.key"),
        dir.join("server.csr"),
    );
    ok(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=lsm-test-ca"])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        .arg("-keyout")
        .arg(&ca_key)
        .arg("-out")
        .arg(&ca));
    ok(Command::new("openssl")
        .args([
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr));
    let ext = dir.join("server.ext");
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    ok(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
        .arg("-in")
        .arg(&csr)
        .arg("-CA")
        .arg(&ca)
        .arg("-CAkey")
        .arg(&ca_key)
        .arg("-extfile")
        .arg(&ext)
        .arg("-out")
        .arg(&crt));
    (ca, crt, key)
}

impl Registry {
    /// Starts a registry storing under `dir`; with `auth`, htpasswd basic auth for that user.
    pub fn start(dir: &Path, auth: Option<(&str, &str)>) -> Registry {
        Registry::start_with(dir, auth, false)
    }

    /// [`Self::start`] over HTTPS, with a certificate of a fresh test CA (see [`Self::ca`]).
    pub fn start_tls(dir: &Path, auth: Option<(&str, &str)>) -> Registry {
        Registry::start_with(dir, auth, true)
    }

    fn start_with(dir: &Path, auth: Option<(&str, &str)>, tls: bool) -> Registry {
        std::fs::create_dir_all(dir).expect("registry dir");
        let port = free_port();
        let mut yml = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("data").display()
        );
        let ca = tls.then(|| {
            let (ca, crt, key) = make_test_ca(&dir.join("tls"));
            yml += &format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                crt.display(),
                key.display()
            );
            ca
        });
        if let Some((u, p)) = auth {
            let line = ok(Command::new("htpasswd").args(["-Bbn", u, p]));
            std::fs::write(dir.join("htpasswd"), line.trim()).expect("htpasswd");
            yml += &format!(
                "auth:\n  htpasswd:\n    realm: lsm-test\n    path: {}\n",
                dir.join("htpasswd").display()
            );
        }
        std::fs::write(dir.join("config.yml"), yml).expect("config");
        let mut r = Registry {
            child: None,
            dir: dir.to_path_buf(),
            url: format!("{}://127.0.0.1:{port}", if tls { "https" } else { "http" }),
            auth: auth.map(|(u, p)| (u.to_string(), p.to_string())),
            ca,
        };
        r.resume();
        r
    }

    /// Stops the process (the data stays).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same address and data.
    pub fn resume(&mut self) {
        let log = std::fs::File::create(self.dir.join("registry.log")).expect("log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(self.dir.join("config.yml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("docker-registry (apt install docker-registry)");
        self.child = Some(child);
        let agent = self.agent();
        for _ in 0..200 {
            if agent.get(&format!("{}/v2/", self.url)).call().is_ok()
                || matches!(
                    agent.get(&format!("{}/v2/", self.url)).call(),
                    Err(ureq::Error::Status(401, _))
                )
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!(
            "registry did not start: {:?}",
            std::fs::read_to_string(self.dir.join("registry.log"))
        );
    }

    /// What the registry served so far, from its access log (level info): one
    /// `(request URI, response bytes)` per completed GET.
    pub fn served(&self) -> Vec<(String, u64)> {
        let log = std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default();
        let field = |line: &str, key: &str| -> Option<String> {
            let at = line.find(&format!(" {key}="))? + key.len() + 2;
            let rest = &line[at..];
            Some(match rest.strip_prefix('"') {
                Some(q) => q.split('"').next()?.to_string(),
                None => rest.split(' ').next()?.to_string(),
            })
        };
        log.lines()
            .filter(|l| l.contains("response completed"))
            .filter(|l| field(l, "http.request.method").as_deref() == Some("GET"))
            .filter_map(|l| {
                let uri = field(l, "http.request.uri")?;
                let n = field(l, "http.response.written")?.parse().ok()?;
                Some((uri, n))
            })
            .collect()
    }

    /// Bytes served of blob `digest` (all GETs of it, ranged or whole).
    pub fn served_of_blob(&self, digest: &str) -> u64 {
        let tail = format!("/blobs/{digest}");
        self.served()
            .iter()
            .filter(|(uri, _)| uri.ends_with(&tail))
            .map(|(_, n)| n)
            .sum()
    }

    /// An HTTP client that trusts this registry (its test CA, when it speaks HTTPS).
    pub fn agent(&self) -> ureq::Agent {
        let mut b = ureq::AgentBuilder::new();
        if let Some(tls) =
            lsmd::source::tls::client_config(self.ca.as_deref()).expect("test CA loads")
        {
            b = b.tls_config(tls);
        }
        b.build()
    }

    fn authed(&self, r: ureq::Request) -> ureq::Request {
        match &self.auth {
            Some((u, p)) => r.set(
                "Authorization",
                &format!(
                    "Basic {}",
                    lsmd::source::auth::base64_encode(format!("{u}:{p}").as_bytes())
                ),
            ),
            None => r,
        }
    }

    /// Uploads `data` as a blob of `repo`; returns its digest.
    pub fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(data)));
        let agent = self.agent();
        let r = self
            .authed(agent.post(&format!("{}/v2/{repo}/blobs/uploads/", self.url)))
            .call()
            .expect("start upload");
        let loc = r.header("location").expect("upload location").to_string();
        let loc = if loc.starts_with('/') {
            format!("{}{loc}", self.url)
        } else {
            loc
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        self.authed(agent.put(&format!("{loc}{sep}digest={digest}")))
            .set("Content-Type", "application/octet-stream")
            .send_bytes(data)
            .expect("finish upload");
        digest
    }

    /// The link that makes blob `digest` part of repository `repo` (remove it and the registry
    /// answers 404 for that blob in that repository).
    pub fn repo_link(&self, repo: &str, digest: &str) -> PathBuf {
        self.dir
            .join("data/docker/registry/v2/repositories")
            .join(repo)
            .join("_layers/sha256")
            .join(digest.trim_start_matches("sha256:"))
    }

    /// The file the registry keeps a blob's bytes in (to damage it on purpose).
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

/// The test's token issuer (`support/token_issuer.py`); killed when dropped.
pub struct TokenIssuer {
    child: Child,
    count_file: PathBuf,
}

impl TokenIssuer {
    /// Tokens issued so far.
    pub fn issued(&self) -> u64 {
        std::fs::read_to_string(&self.count_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    /// Switches the registry to bearer-token auth (`auth: token`) served by a fresh issuer whose
    /// tokens live `ttl_secs`, and restarts it on the same address and data.
    pub fn use_token_auth(&mut self, ttl_secs: u32) -> TokenIssuer {
        let key = self.dir.join("issuer.key");
        let cert = self.dir.join("issuer.crt");
        ok(Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=lsm-test-issuer",
                "-keyout",
            ])
            .arg(&key)
            .arg("-out")
            .arg(&cert));
        let port = free_port();
        let count_file = self.dir.join("tokens-issued");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("support/token_issuer.py");
        let child = Command::new("python3")
            .arg(script)
            .arg(port.to_string())
            .arg(&key)
            .arg(&cert)
            .arg(ttl_secs.to_string())
            .arg(&count_file)
            .spawn()
            .expect("python3 token issuer");
        let realm = format!("http://127.0.0.1:{port}/token");
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let yml = std::fs::read_to_string(self.dir.join("config.yml")).expect("config");
        let base = yml.split("auth:").next().unwrap_or(&yml).to_string();
        std::fs::write(
            self.dir.join("config.yml"),
            format!(
                "{base}auth:\n  token:\n    realm: {realm}\n    service: lsm-registry\n    issuer: lsm-test-issuer\n    rootcertbundle: {}\n",
                cert.display()
            ),
        )
        .expect("config");
        self.stop();
        self.auth = None;
        self.resume();
        TokenIssuer { child, count_file }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

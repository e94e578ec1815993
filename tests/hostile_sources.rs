//! Remote sources against servers that misbehave on purpose (support/hostile.rs): every remote
//! layer must be anchored by its `meta_digest`; credentials go only to the registry (not to a
//! foreign token realm, a redirect target, an upload location on another host, or a mirror);
//! no secret reaches an error, a log or /metrics; a server ignoring Range, answering for other
//! bytes, asking to retry later, lacking the blob or sending bad bytes gets the right answer
//! from elsewhere or a clear error at once; absurd token lifetimes do not bring lsmd down.
//! Images are opened through lsmd's own `ImageSpec` (what `lsmd serve` does) or `lsmd serve`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lsm_e2e::hostile::{Reply, Req, Server};
use lsm_e2e::nbd::*;
use lsm_e2e::*;
use lsmd::{HostServices, ImageSpec};
use serde_json::{json, Value};

const REPO: &str = "lsm/test";

/// A one-layer image of 4 MiB of random bytes, its blob in memory for the servers to serve.
struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    raw: Vec<u8>,
    blob: Arc<Vec<u8>>,
    digest: String,
    meta_digest: String,
}

fn fixture() -> Fixture {
    use rand::{Rng, SeedableRng};
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().to_path_buf();
    let mut raw = vec![0u8; 4 << 20];
    rand::rngs::StdRng::seed_from_u64(14).fill(&mut raw[..]);
    let (img, _) = image_from_bytes(&dir, &raw, &[]);
    let c: Value = serde_json::from_slice(&std::fs::read(&img).expect("config")).expect("json");
    let blob = std::fs::read(dir.join("base.blob")).expect("blob");
    Fixture {
        _tmp: tmp,
        raw,
        blob: Arc::new(blob),
        digest: c["layers"][0]["digest"].as_str().expect("digest").into(),
        meta_digest: c["layers"][0]["meta_digest"].as_str().expect("meta").into(),
        dir,
    }
}

impl Fixture {
    /// Writes config `name` with one layer from `source` (`meta_digest` only if `anchored`).
    fn config(&self, name: &str, source: Value, anchored: bool) -> PathBuf {
        let mut layer = json!({ "source": source, "digest": self.digest });
        if anchored {
            layer["meta_digest"] = self.meta_digest.clone().into();
        }
        let p = self.dir.join(name);
        let c = json!({ "size": self.raw.len(), "layers": [layer] });
        std::fs::write(&p, c.to_string()).expect("write config");
        p
    }

    /// A registry source at `url` (plain HTTP allowed) with `extra` fields.
    fn registry(&self, name: &str, url: &str, extra: Value) -> PathBuf {
        let mut r = json!({ "url": url, "repository": REPO, "insecure": true });
        for (k, v) in extra.as_object().into_iter().flatten() {
            r[k] = v.clone();
        }
        self.config(name, json!({ "registry": r }), true)
    }

    /// The blob's path in a registry.
    fn blob_path(&self) -> String {
        format!("/v2/{REPO}/blobs/{}", self.digest)
    }
}

/// Opens `config` as lsmd does and reads the whole disk.
fn read_all(config: &Path, host: &HostServices) -> Result<Vec<u8>, String> {
    let spec = ImageSpec::load(config).map_err(|e| e.to_string())?;
    let image = spec.open_image(false, host).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; image.size() as usize];
    image.read(0, &mut buf).map_err(|e| e.to_string())?;
    Ok(buf)
}

/// [`read_all`], as a reader asking 128 KiB at a time, one after another, would read it.
fn read_in_pieces(config: &Path, host: &HostServices) -> Result<Vec<u8>, String> {
    let spec = ImageSpec::load(config).map_err(|e| e.to_string())?;
    let image = spec.open_image(false, host).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; image.size() as usize];
    for (i, piece) in buf.chunks_mut(128 << 10).enumerate() {
        image
            .read((i as u64) << 17, piece)
            .map_err(|e| e.to_string())?;
    }
    Ok(buf)
}

/// Host services that give up after `secs` instead of a minute.
fn patient_for(secs: u64) -> HostServices {
    let mut h = HostServices::default();
    h.retry.give_up_after = Duration::from_secs(secs);
    h
}

/// An honest registry serving the fixture's blob.
fn honest(f: &Fixture) -> Server {
    let blob = f.blob.clone();
    Server::start("127.0.0.1", move |r| Reply::honest(&blob, r))
}

fn gets(s: &Server) -> usize {
    s.requests().iter().filter(|r| r.method == "GET").count()
}

// ---- 1. Every remote layer is anchored ----

#[test]
fn remote_layers_without_meta_digest_are_refused_unless_allowed() {
    let f = fixture();
    let server = honest(&f);
    let url = format!("{}{}", server.url, f.blob_path());
    std::fs::copy(f.dir.join("base.blob"), f.dir.join("nas.blob")).expect("copy");
    let sources = [
        json!({ "registry": { "url": server.url, "repository": REPO, "insecure": true } }),
        json!({ "http": { "url": url, "insecure": true } }),
        json!({ "nas": { "path": "nas.blob" } }),
    ];
    for (i, s) in sources.iter().enumerate() {
        let bare = f.config(&format!("bare{i}.json"), s.clone(), false);
        let e = read_all(&bare, &HostServices::default()).expect_err("an unanchored layer opened");
        assert!(
            e.contains("layers[0].meta_digest") && e.contains("refusing"),
            "{s}: {e}"
        );
        // Anchored, the same source serves the right bytes.
        let anchored = f.config(&format!("anchored{i}.json"), s.clone(), true);
        assert!(read_all(&anchored, &HostServices::default()).expect("read") == f.raw);
    }
    // A dictionary entry is held to the same rule.
    let c = json!({ "size": f.raw.len(), "layers": [], "dictionary": [
        { "source": sources[0], "digest": f.digest }
    ] });
    let dict = f.dir.join("dict.json");
    std::fs::write(&dict, c.to_string()).expect("write");
    let o = run(lsmctl(["verify"]).arg(&dict));
    let err = String::from_utf8_lossy(&o.stderr) + String::from_utf8_lossy(&o.stdout);
    assert!(
        !o.status.success() && err.contains("dictionary[0].meta_digest"),
        "{err}"
    );

    // `lsmd serve --help` says what it refuses and why.
    let help = ok(Command::new(bin("lsmd")).args(["serve", "--help"]));
    assert!(
        help.contains("without `meta_digest`") && help.contains("--allow-unverified"),
        "{help}"
    );
    // lsmd serve refuses to start, saying why; --allow-unverified serves it with a warning.
    let bare = f.dir.join("bare0.json");
    let o = run(Command::new(bin("lsmd"))
        .args(["serve", "--config"])
        .arg(&bare)
        .arg("--socket")
        .arg(f.dir.join("x.sock")));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("meta_digest") && err.contains("--allow-unverified"),
        "{err}"
    );
    let d = Lsmd::start(
        &f.dir.join("lsmd.sock"),
        &[
            OsStr::new("--config"),
            bare.as_os_str(),
            OsStr::new("--allow-unverified"),
        ],
    );
    assert!(d.log().contains("NOT verified"), "{}", d.log());
    d.terminate();
}

#[test]
fn verify_checks_the_whole_blob_digest_of_a_local_layer() {
    let f = fixture();
    let img = f.dir.join("img.json");
    ok(lsmctl(["verify"]).arg(&img));
    // The config names another blob: verify says the bytes are not that blob.
    let mut c: Value = serde_json::from_slice(&std::fs::read(&img).expect("read")).expect("json");
    c["layers"][0]["digest"] = format!("sha256:{}", "ab".repeat(32)).into();
    std::fs::write(&img, c.to_string()).expect("write");
    let o = run(lsmctl(["verify"]).arg(&img));
    let out = String::from_utf8_lossy(&o.stdout) + String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && out.contains("is not the expected"),
        "{out}"
    );
}

// ---- 2. Credentials go only where they belong ----

/// A token server on `ip` answering `body`, recording requests.
fn token_server(ip: &str, body: Value) -> Server {
    Server::start(ip, move |_| {
        Reply::new(200)
            .header("Content-Type", "application/json")
            .body(body.to_string().into_bytes())
    })
}

/// A registry demanding a bearer token from `realm`; any token will do.
fn bearer_registry(f: &Fixture, realm: String) -> Server {
    let blob = f.blob.clone();
    Server::start("127.0.0.1", move |r| match r.header("authorization") {
        Some(a) if a.starts_with("Bearer ") => Reply::honest(&blob, r),
        _ => Reply::new(401).header(
            "WWW-Authenticate",
            &format!(r#"Bearer realm="{realm}",service="reg",scope="repository:{REPO}:pull""#),
        ),
    })
}

#[test]
fn a_token_realm_on_another_host_gets_no_credentials_unless_configured() {
    let f = fixture();
    let issuer = token_server("127.0.0.2", json!({ "token": "t0k" }));
    let reg = bearer_registry(&f, format!("{}/token", issuer.url));
    let creds = json!({ "username": "lsm", "password": "s3cret" });
    let c = f.registry("foreign.json", &reg.url, creds.clone());
    assert!(read_all(&c, &HostServices::default()).expect("read") == f.raw);
    let asked = issuer.requests();
    assert!(!asked.is_empty(), "no token was asked for");
    assert!(
        asked.iter().all(|r| r.header("authorization").is_none()),
        "the foreign realm received credentials: {asked:?}"
    );

    // Listed in token_hosts, the realm gets them (Basic lsm:s3cret).
    let mut extra = creds;
    extra["token_hosts"] = json!([issuer.host]);
    let c = f.registry("trusted.json", &reg.url, extra);
    assert!(read_all(&c, &HostServices::default()).expect("read") == f.raw);
    let basic = format!("Basic {}", lsmd::source::auth::base64_encode(b"lsm:s3cret"));
    assert!(
        issuer
            .requests()
            .iter()
            .any(|r| r.header("authorization") == Some(basic.as_str())),
        "the configured token host got no credentials"
    );
}

#[test]
fn absurd_token_lifetimes_neither_panic_nor_wedge_lsmd() {
    let f = fixture();
    for (i, ttl) in [json!(u64::MAX), json!(1e30), json!(-1), json!(0)]
        .into_iter()
        .enumerate()
    {
        let issuer = token_server("127.0.0.1", json!({ "token": "t", "expires_in": ttl }));
        let reg = bearer_registry(&f, format!("{}/token", issuer.url));
        let c = f.registry(&format!("ttl{i}.json"), &reg.url, json!({}));
        let sock = f.dir.join(format!("ttl{i}.sock"));
        let d = Lsmd::start(&sock, &[OsStr::new("--config"), c.as_os_str()]);
        let mut nbd = RawClient::connect(&sock).expect("connect");
        let got = nbd.read(1 << 20, 1 << 20).expect("read");
        assert!(
            got.as_deref() == Ok(&f.raw[1 << 20..2 << 20]),
            "expires_in {ttl}: {:?}",
            got.err()
        );
        drop(nbd);
        let st = d.terminate();
        assert!(st.success(), "expires_in {ttl}: lsmd exited {st}");
    }
}

#[test]
fn a_401_from_a_redirect_target_is_not_the_registrys_challenge() {
    let f = fixture();
    // Blob storage on another host answers 401 with a challenge naming its own token server.
    let evil = token_server("127.0.0.3", json!({ "token": "stolen" }));
    let realm = format!("{}/token", evil.url);
    let storage = Server::start("127.0.0.4", move |_| {
        Reply::new(401).header("WWW-Authenticate", &format!(r#"Bearer realm="{realm}""#))
    });
    let (blob, to) = (f.blob.clone(), storage.url.clone());
    let reg = Server::start("127.0.0.1", move |r| match r.header("authorization") {
        None => Reply::new(401).header("WWW-Authenticate", r#"Basic realm="reg""#),
        Some(_) if r.method == "HEAD" => Reply::honest(&blob, r),
        Some(_) => Reply::new(307).header("Location", &format!("{to}/b?X-Sig=SIGSECRET")),
    });
    let c = f.registry(
        "redirect.json",
        &reg.url,
        json!({ "username": "lsm", "password": "s3cret" }),
    );
    let t0 = Instant::now();
    let e = read_all(&c, &HostServices::default()).expect_err("read through a 401");
    assert!(e.contains("redirect target"), "{e}");
    assert!(!e.contains("SIGSECRET"), "{e}");
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t0.elapsed()
    );
    assert!(
        evil.requests().is_empty(),
        "the redirect target's token server was asked: {:?}",
        evil.requests()
    );
    assert!(storage
        .requests()
        .iter()
        .all(|r| r.header("authorization").is_none()));
}

#[test]
fn a_registrys_credentials_are_not_sent_to_its_mirrors() {
    let f = fixture();
    let primary = Server::start("127.0.0.1", |_| Reply::new(503));
    let blob = f.blob.clone();
    let mirror = Server::start("127.0.0.1", move |r| {
        let want = format!(
            "Basic {}",
            lsmd::source::auth::base64_encode(b"mirror-user:mirror-pw")
        );
        if r.header("authorization") == Some(want.as_str()) {
            Reply::honest(&blob, r)
        } else {
            Reply::new(401).header("WWW-Authenticate", r#"Basic realm="mirror""#)
        }
    });
    let creds = json!({ "username": "lsm", "password": "s3cret", "mirrors": [mirror.url] });
    let c = f.registry("plain-mirror.json", &primary.url, creds);
    let e =
        read_all(&c, &patient_for(2)).expect_err("the mirror let us in without its credentials");
    assert!(e.contains("401"), "{e}");
    let leaked = format!("Basic {}", lsmd::source::auth::base64_encode(b"lsm:s3cret"));
    assert!(
        mirror
            .requests()
            .iter()
            .all(|r| r.header("authorization") != Some(leaked.as_str())),
        "the mirror received the registry's credentials"
    );

    // Given per mirror, its own credentials are used.
    let creds = json!({ "username": "lsm", "password": "s3cret", "mirrors": [
        { "url": mirror.url, "username": "mirror-user", "password": "mirror-pw" }
    ] });
    let c = f.registry("own-mirror.json", &primary.url, creds);
    assert!(read_all(&c, &patient_for(20)).expect("read") == f.raw);
}

#[test]
fn secrets_never_reach_errors_logs_or_metrics() {
    let f = fixture();
    let failing = Arc::new(AtomicU64::new(0));
    let (blob, fl) = (f.blob.clone(), failing.clone());
    let server = Server::start("127.0.0.1", move |r| {
        if fl.load(Ordering::Relaxed) > 0 && r.method == "GET" {
            Reply::new(403)
        } else {
            Reply::honest(&blob, r)
        }
    });
    // A presigned URL: its query is a credential.
    let url = format!(
        "http://user:PWSECRET@{}{}?X-Amz-Signature=SIGSECRET",
        server.host,
        f.blob_path()
    );
    let c = f.config(
        "presigned.json",
        json!({ "http": { "url": url, "insecure": true } }),
        true,
    );
    let sock = f.dir.join("lsmd.sock");
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let d = Lsmd::start(
        &sock,
        &[
            OsStr::new("--config"),
            c.as_os_str(),
            OsStr::new("--metrics"),
            OsStr::new(&metrics),
        ],
    );
    let mut nbd = RawClient::connect(&sock).expect("connect");
    assert!(nbd.read(0, 65536).expect("read").is_ok());
    failing.store(1, Ordering::Relaxed);
    let failed = nbd.read(3 << 20, 65536).expect("read");
    assert!(failed.is_err(), "a read past a 403 succeeded");
    drop(nbd);
    let mut seen = String::new();
    for page in ["metrics", "status"] {
        seen += &ureq::get(&format!("http://{metrics}/{page}"))
            .call()
            .expect("metrics")
            .into_string()
            .expect("text");
    }
    d.terminate();
    seen += &std::fs::read_to_string(sock.with_extension("log")).expect("log");
    assert!(seen.contains("403"), "the failure is not reported: {seen}");
    for secret in ["SIGSECRET", "PWSECRET"] {
        assert!(!seen.contains(secret), "{secret} leaked:\n{seen}");
    }
}

#[test]
fn push_sends_no_credentials_to_an_upload_location_on_another_host() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let src = t.join("src");
    tiny_oci_layout(&src);
    // Uploads go to blob storage on another host, named by the registry's Location.
    let storage = Server::start("127.0.0.6", |r| match r.method.as_str() {
        "PUT" => Reply::new(201),
        _ => Reply::new(404),
    });
    let to = storage.url.clone();
    let reg = Server::start("127.0.0.1", move |r| {
        if r.header("authorization").is_none() {
            return Reply::new(401).header("WWW-Authenticate", r#"Basic realm="reg""#);
        }
        match (r.method.as_str(), r.path()) {
            ("POST", p) if p.ends_with("/blobs/uploads/") => {
                Reply::new(202).header("Location", &format!("{to}/upload/1?_state=STATESECRET"))
            }
            ("PUT", p) if p.contains("/manifests/") => Reply::new(201),
            _ => Reply::new(404),
        }
    });
    let o = run(
        lsmctl(["convert", "-q", "--no-reuse", "--insecure", "--size", "64M"])
            .args(["--username", "lsm", "--password", "s3cret", "--push"])
            .arg(format!("{}/lsm/pushed:t", reg.url))
            .arg(&src)
            .arg(t.join("dst")),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let puts = storage.requests();
    assert!(
        puts.iter().any(|r| r.method == "PUT"),
        "nothing was uploaded"
    );
    assert!(
        puts.iter().all(|r| r.header("authorization").is_none()),
        "the upload location on another host received credentials"
    );
    assert!(
        reg.requests()
            .iter()
            .any(|r| r.method == "PUT" && r.header("authorization").is_some()),
        "the manifest was not put with the registry's credentials"
    );
}

// ---- 3. Bad servers get the right answer or a clear error, fast ----

#[test]
fn a_server_ignoring_range_is_refused_at_once_and_the_mirror_serves() {
    let f = fixture();
    let blob = f.blob.clone();
    let whole = Server::start("127.0.0.1", move |r| {
        if r.method == "HEAD" {
            Reply::honest(&blob, r)
        } else {
            Reply::new(200).body(blob.to_vec())
        }
    });
    let c = f.registry("ignores.json", &whole.url, json!({}));
    let t0 = Instant::now();
    let e = read_all(&c, &HostServices::default()).expect_err("served by a server ignoring Range");
    assert!(
        e.contains("ignores Range") && e.contains(&whole.host),
        "{e}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t0.elapsed()
    );

    // Behind it an honest mirror: the disk is right, and the first server is not asked for
    // (and does not send) the blob once per chunk.
    let mirror = honest(&f);
    let before = gets(&whole);
    let c = f.registry(
        "ignores-mirrored.json",
        &whole.url,
        json!({ "mirrors": [mirror.url] }),
    );
    assert!(read_all(&c, &HostServices::default()).expect("read") == f.raw);
    let asked = gets(&whole) - before;
    assert!(
        asked <= 2 && gets(&mirror) >= 1,
        "the server ignoring Range got {asked} GETs, the mirror {}",
        gets(&mirror)
    );
}

/// A server answering every ranged GET of chunk bytes with other bytes: those `shift` further
/// on (or back, or — for a merged fetch of every chunk, which leaves no room — the asked bytes
/// rotated by `shift`); `honest_header` says a range other than the one asked for, otherwise
/// it claims the one asked for. Reads of the blob's tail (the metadata) are answered right, so
/// the layer opens.
fn shifting(f: &Fixture, shift: u64, honest_header: bool) -> Server {
    let blob = f.blob.clone();
    Server::start("127.0.0.1", move |r| {
        let n = blob.len() as u64;
        match r.range() {
            Some((a, b)) if r.method == "GET" && b + 1 < n => {
                let body = if b + shift < n {
                    blob[(a + shift) as usize..=(b + shift) as usize].to_vec()
                } else if a >= shift {
                    blob[(a - shift) as usize..=(b - shift) as usize].to_vec()
                } else {
                    let mut v = blob[a as usize..=b as usize].to_vec();
                    let k = (shift % (b - a + 1)) as usize;
                    v.rotate_left(k.max(1));
                    v
                };
                let shown = if honest_header {
                    (a + shift, b + shift)
                } else {
                    (a, b)
                };
                Reply::new(206)
                    .header(
                        "Content-Range",
                        &format!("bytes {}-{}/{n}", shown.0, shown.1),
                    )
                    .body(body)
            }
            _ => Reply::honest(&blob, r),
        }
    })
}

#[test]
fn a_reply_for_other_bytes_fails_fast_and_the_mirror_serves() {
    let f = fixture();
    let shifted = shifting(&f, 4096, true);
    let c = f.registry("shifted.json", &shifted.url, json!({}));
    let t0 = Instant::now();
    let e = read_all(&c, &HostServices::default()).expect_err("read other bytes");
    assert!(
        e.contains("Content-Range") && e.contains(&shifted.host),
        "{e}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t0.elapsed()
    );

    let mirror = honest(&f);
    let c = f.registry(
        "shifted-mirrored.json",
        &shifted.url,
        json!({ "mirrors": [mirror.url] }),
    );
    assert!(read_all(&c, &HostServices::default()).expect("read") == f.raw);
}

#[test]
fn a_chunk_failing_its_check_is_fetched_again_from_the_next_source() {
    let f = fixture();
    // Claims the right range, sends other bytes: only the chunk check can tell. The tail of the
    // blob (metadata) is served right, so the layer opens.
    let liar = shifting(&f, 4096, false);
    let mirror = honest(&f);
    let c = f.registry("liar.json", &liar.url, json!({ "mirrors": [mirror.url] }));
    assert!(read_all(&c, &HostServices::default()).expect("read") == f.raw);
    assert!(gets(&mirror) > 0, "the mirror was never asked");

    // Alone, the liar's chunks fail with a check error (one more try, then the error).
    let c = f.registry("liar-alone.json", &liar.url, json!({}));
    let e = read_all(&c, &HostServices::default()).expect_err("bad bytes served");
    assert!(
        e.contains("corrupt") || e.contains("checksum") || e.contains("digest"),
        "{e}"
    );
}

#[test]
fn a_bad_p2p_piece_is_dropped_and_the_registry_behind_serves() {
    let f = fixture();
    let reg = honest(&f);
    // The agent (an HTTP proxy) flips a byte in the first answer for each range.
    let seen = Arc::new(std::sync::Mutex::new(Vec::<(u64, u64)>::new()));
    let (blob, s2) = (f.blob.clone(), seen.clone());
    let agent = Server::start("127.0.0.1", move |r| {
        let mut reply = Reply::honest(&blob, r);
        if let (Some(rg), 206) = (r.range(), reply.status) {
            let mut s = s2.lock().expect("seen");
            let first = !s.contains(&rg);
            s.push(rg);
            let n = reply.body.len();
            // (the blob's tail holds the metadata: flip only chunk bytes)
            if first && rg.1 + 1 < blob.len() as u64 - 65536 && n > 100 {
                reply.body[n / 2] ^= 0xff;
            }
        }
        reply
    });
    let p2p = json!({ "p2p": { "proxy": agent.url, "piece_size": 1048576 } });
    let c = f.registry("p2p.json", &reg.url, p2p);
    assert!(read_in_pieces(&c, &HostServices::default()).expect("read") == f.raw);
    assert!(
        gets(&reg) > 0,
        "the registry behind the agent was never asked"
    );
    // Dropped, not kept: a bad piece was asked of the agent again later.
    let s = seen.lock().expect("seen").clone();
    let again = s
        .iter()
        .filter(|r| s.iter().filter(|x| x == r).count() > 1)
        .count();
    assert!(again > 0, "no bad piece was asked for again: {s:?}");
}

#[test]
fn retry_after_is_honoured() {
    let f = fixture();
    let (blob, n) = (f.blob.clone(), Arc::new(AtomicU64::new(0)));
    let server = Server::start("127.0.0.1", move |r: &Req| {
        if r.method == "GET" && n.fetch_add(1, Ordering::Relaxed) < 2 {
            Reply::new(503).header("Retry-After", "1")
        } else {
            Reply::honest(&blob, r)
        }
    });
    let c = f.registry("busy.json", &server.url, json!({}));
    assert!(read_all(&c, &HostServices::default()).expect("read") == f.raw);
    let got: Vec<Req> = server
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET")
        .collect();
    for w in got.windows(2).take(2) {
        let gap = w[1].at - w[0].at;
        assert!(gap >= Duration::from_millis(950), "retried after {gap:?}");
    }
}

#[test]
fn mirrors_take_over_on_404_and_403() {
    let f = fixture();
    let mirror = honest(&f);
    for code in [404u16, 403] {
        let missing = Server::start("127.0.0.1", move |_| Reply::new(code));
        let c = f.registry(
            &format!("m{code}.json"),
            &missing.url,
            json!({ "size": f.blob.len(), "mirrors": [mirror.url] }),
        );
        assert!(read_all(&c, &HostServices::default()).expect("read") == f.raw);
    }
}

#[test]
fn a_stream_cut_part_way_is_resumed_for_the_rest_only() {
    let f = fixture();
    // The first long GET (a layer streamed in order, as a startup layer is) is cut after
    // half its body; every other request is answered honestly.
    let (blob, cut) = (f.blob.clone(), Arc::new(AtomicU64::new(0)));
    let server = Server::start("127.0.0.1", move |r: &Req| {
        let mut reply = Reply::honest(&blob, r);
        let long = r.range().is_some_and(|(a, b)| b - a >= 1 << 20);
        if long && reply.status == 206 && cut.fetch_add(1, Ordering::Relaxed) == 0 {
            let n = reply.body.len();
            reply = reply.header("Content-Length", &n.to_string());
            reply.body.truncate(n / 2);
        }
        reply
    });
    let c = f.registry("cut.json", &server.url, json!({}));
    let spec = ImageSpec::load(&c).expect("spec");
    let image = spec
        .open_image(false, &HostServices::default())
        .expect("open");
    let n = image.lower().layers()[0].metadata().chunks.len() as u32;
    image
        .lower()
        .stream_chunks(0, 0, n, u64::MAX)
        .expect("stream resumed");
    let long: Vec<(u64, u64)> = server
        .requests()
        .iter()
        .filter_map(Req::range)
        .filter(|(a, b)| b - a >= 1 << 20)
        .collect();
    assert_eq!(long.len(), 2, "{long:?}");
    let (first, again) = (long[0], long[1]);
    let asked = first.1 - first.0 + 1;
    assert_eq!(again.1, first.1, "{long:?}");
    assert_eq!(
        again.0,
        first.0 + asked / 2,
        "not resumed where it was cut: {long:?}"
    );
    // Every chunk came in by the stream: reading the disk fetches nothing more.
    let gets_before = gets(&server);
    let mut buf = vec![0u8; image.size() as usize];
    image.read(0, &mut buf).expect("read");
    assert!(buf == f.raw);
    assert_eq!(gets(&server), gets_before);
}

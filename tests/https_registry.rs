//! The registry paths over HTTPS: a real `docker-registry` serving TLS with a certificate of a
//! test CA made here with openssl, trusted by lsm only through `ca_file` / `--registry-ca` (never
//! the system store). Lazy reads with basic auth, a mirror taking over, the P2P agent falling
//! back to the registry (and carrying HTTPS through a CONNECT tunnel), and `lsmctl convert
//! --push`; a certificate lsm was not told to trust is a clear error at once, not a minute of
//! retries.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lsm_e2e::nbd::*;
use lsm_e2e::registry::Registry;
use lsm_e2e::*;
use serde_json::{json, Value};

const REPO: &str = "lsm/test";

/// An 8 MiB image of random bytes in one layer; returns (local config, raw disk, blob digest,
/// metadata digest).
fn image(t: &Path) -> (PathBuf, PathBuf, String, String) {
    use rand::{Rng, SeedableRng};
    let mut raw = vec![0u8; 8 << 20];
    rand::rngs::StdRng::seed_from_u64(5).fill(&mut raw[..]);
    let (img, raw) = image_from_bytes(t, &raw, &[]);
    let c: Value = serde_json::from_slice(&std::fs::read(&img).expect("config")).expect("json");
    let l = &c["layers"][0];
    (
        img,
        raw,
        l["digest"].as_str().expect("digest").into(),
        l["meta_digest"].as_str().expect("meta").into(),
    )
}

/// Writes config `name` reading the layer from registry source `src`.
fn remote(t: &Path, name: &str, raw: &Path, digest: &str, meta: &str, src: Value) -> PathBuf {
    let size = std::fs::metadata(raw).expect("raw").len();
    let c = json!({ "size": size, "layers": [
        { "source": { "registry": src }, "digest": digest, "meta_digest": meta }
    ] });
    let p = t.join(name);
    std::fs::write(&p, c.to_string()).expect("write");
    p
}

fn serve(t: &Path, sock: &str, config: &Path, extra: &[&OsStr]) -> Lsmd {
    let mut args = vec![OsStr::new("--config"), config.as_os_str()];
    args.extend_from_slice(extra);
    Lsmd::start(&t.join(sock), &args)
}

fn copy_matches(d: &Lsmd, t: &Path, raw: &Path) {
    let copy = t.join("copy.raw");
    ok(Command::new("nbdcopy").arg(d.uri()).arg(&copy));
    assert_eq!(sha256_file(&copy), sha256_file(raw));
}

#[test]
fn lsmd_reads_an_https_registry_trusting_only_the_configured_ca() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let (img, raw, digest, meta) = image(t);
    let _ = img;
    let reg = Registry::start_tls(&t.join("registry"), Some(("lsm", "s3cret")));
    let ca = reg.ca.clone().expect("ca");
    assert_eq!(
        reg.push_blob(REPO, &std::fs::read(t.join("base.blob")).expect("blob")),
        digest
    );
    let src =
        json!({ "url": reg.url, "repository": REPO, "username": "lsm", "password": "s3cret" });

    // Trusted through the config's ca_file: the disk reads right.
    let mut with_ca = src.clone();
    with_ca["ca_file"] = ca.display().to_string().into();
    let c = remote(t, "tls.json", &raw, &digest, &meta, with_ca);
    let d = serve(t, "a.sock", &c, &[]);
    copy_matches(&d, t, &raw);
    d.terminate();

    // Trusted through --registry-ca: the same.
    let c = remote(t, "tls-flag.json", &raw, &digest, &meta, src.clone());
    let d = serve(
        t,
        "b.sock",
        &c,
        &[OsStr::new("--registry-ca"), ca.as_os_str()],
    );
    copy_matches(&d, t, &raw);
    d.terminate();

    // Not told to trust the CA: lsmd refuses at once, saying it is the certificate.
    let t0 = Instant::now();
    let o = run(Command::new(bin("lsmd"))
        .args(["serve", "--config"])
        .arg(&c)
        .arg("--socket")
        .arg(t.join("c.sock")));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("TLS") && err.contains("certificate"),
        "{err}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "an untrusted certificate took {:?} to report",
        t0.elapsed()
    );
    assert!(!err.contains("s3cret"), "{err}");
}

#[test]
fn a_mirror_and_the_p2p_fallback_work_over_https() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let (_, raw, digest, meta) = image(t);
    // The primary lacks the blob (404); the mirror has it. Each has its own test CA: one
    // ca_file holds both.
    let primary = Registry::start_tls(&t.join("primary"), None);
    let mirror = Registry::start_tls(&t.join("mirror"), None);
    mirror.push_blob(REPO, &std::fs::read(t.join("base.blob")).expect("blob"));
    let cas = t.join("cas.pem");
    let mut pem = std::fs::read(primary.ca.as_ref().expect("ca")).expect("ca");
    pem.extend(std::fs::read(mirror.ca.as_ref().expect("ca")).expect("ca"));
    std::fs::write(&cas, pem).expect("cas");
    let src = json!({
        "url": primary.url, "repository": REPO, "mirrors": [mirror.url],
        "ca_file": cas.display().to_string(),
    });
    let c = remote(t, "mirrored.json", &raw, &digest, &meta, src.clone());
    let d = serve(t, "a.sock", &c, &[]);
    copy_matches(&d, t, &raw);
    assert!(d.log().contains("failed over"), "{}", d.log());
    d.terminate();

    // Through a P2P agent's proxy (squid): HTTPS is tunnelled (CONNECT), the disk reads right.
    let mut squid = lsm_e2e::squid::Squid::start(&t.join("squid"));
    let mut p2p =
        json!({ "url": mirror.url, "repository": REPO, "ca_file": cas.display().to_string() });
    p2p["p2p"] = json!({ "proxy": squid.url, "piece_size": 1048576 });
    let c = remote(t, "p2p.json", &raw, &digest, &meta, p2p);
    let d = serve(t, "p.sock", &c, &[]);
    copy_matches(&d, t, &raw);
    d.terminate();
    let log = squid.access_log();
    assert!(log.contains("CONNECT"), "the agent carried nothing:\n{log}");

    // The agent is down: lsmd says so and reads from the registry over HTTPS.
    squid.stop();
    let d = serve(t, "b.sock", &c, &[]);
    copy_matches(&d, t, &raw);
    assert!(
        d.log().contains("falling back to the registry"),
        "{}",
        d.log()
    );
    d.terminate();
}

#[test]
fn convert_pushes_to_an_https_registry() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let src = t.join("src");
    tiny_oci_layout(&src);
    let reg = Registry::start_tls(&t.join("registry"), None);
    let ca = reg.ca.clone().expect("ca");
    let target = format!("{}/lsm/converted:t", reg.url);
    let push = |dst: &Path, ca: Option<&Path>| {
        let mut c = lsmctl([
            "convert",
            "-q",
            "--no-reuse",
            "--size",
            "64M",
            "--push",
            &target,
        ]);
        if let Some(ca) = ca {
            c.arg("--registry-ca").arg(ca);
        }
        run(c.arg(&src).arg(dst))
    };

    // Without the CA: refused, naming the certificate.
    let o = push(&t.join("dst0"), None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("certificate"), "{err}");

    let o = push(&t.join("dst"), Some(&ca));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The config it writes anchors every layer and trusts the CA it was given.
    let remote = t.join("dst/lsm-remote.json");
    let c: Value = serde_json::from_slice(&std::fs::read(&remote).expect("remote")).expect("json");
    for l in c["layers"].as_array().expect("layers") {
        assert!(l["meta_digest"].is_string(), "{l}");
        assert!(l["source"]["registry"]["ca_file"].is_string(), "{l}");
    }
    // Every byte of it reads back from the registry over HTTPS and checks out.
    ok(lsmctl(["verify"]).arg(&remote));

    // `lsmctl pull` resolves it over HTTPS trusting the same CA (it then fails only at the
    // containerd socket, which this test has none of); without it, the certificate is named.
    let image = target.trim_start_matches("https://").to_string();
    let pull = |ca: Option<&Path>| {
        let mut c = lsmctl(["pull", "--address", "/nonexistent/containerd.sock"]);
        if let Some(ca) = ca {
            c.arg("--registry-ca").arg(ca);
        }
        run(c.arg(&image))
    };
    let o = pull(None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("certificate"), "{err}");
    let o = pull(Some(&ca));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("resolved to manifest sha256:"), "{err}");
    assert!(err.contains("containerd"), "{err}");
    let o = run(lsmctl(["pull", "--platform", "linux", "--registry-ca"])
        .arg(&ca)
        .arg(&image));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--platform"), "{err}");
}

//! lsmd serving an image whose layers live in a real registry (`docker-registry` on
//! 127.0.0.1): lazy ranged fetches, the host cache across restarts, its bound and its damage
//! checks, basic auth, a registry restart in the middle of a read, and a damaged blob.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use lsm_e2e::nbd::*;
use lsm_e2e::registry::Registry;
use lsm_e2e::*;

/// Pushes the layers of the local image `img` to `reg` and writes a config reading them from
/// there (`remote.json`, with its own upper layer).
fn remote_config(t: &Path, img: &Path, reg: &Registry, creds: bool) -> PathBuf {
    let mut c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(img).expect("read config")).expect("json");
    let layers = c["layers"].as_array_mut().expect("layers");
    for l in layers.iter_mut() {
        let path = t.join(l["source"]["local"].as_str().expect("local layer"));
        let digest = reg.push_blob("lsm/test", &std::fs::read(&path).expect("read blob"));
        assert_eq!(l["digest"].as_str(), Some(digest.as_str()));
        let mut src = serde_json::json!({
            "url": reg.url, "repository": "lsm/test", "insecure": true
        });
        if let (true, Some((u, p))) = (creds, &reg.auth) {
            src["username"] = u.clone().into();
            src["password"] = p.clone().into();
        }
        l["source"] = serde_json::json!({ "registry": src });
    }
    c["upper"] = "remote.upper".into();
    let out = t.join("remote.json");
    std::fs::write(&out, serde_json::to_vec_pretty(&c).expect("json")).expect("write");
    out
}

fn metric(port: u16, name: &str) -> f64 {
    let text = ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
        .call()
        .expect("metrics")
        .into_string()
        .expect("text");
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in metrics:\n{text}"))
}

fn serve(sock: &Path, config: &Path, cache: &Path, limit: &str, port: u16) -> Lsmd {
    let metrics = format!("127.0.0.1:{port}");
    Lsmd::start(
        sock,
        &[
            OsStr::new("--config"),
            config.as_os_str(),
            OsStr::new("--cache-dir"),
            cache.as_os_str(),
            OsStr::new("--cache-limit"),
            OsStr::new(limit),
            OsStr::new("--metrics"),
            OsStr::new(&metrics),
        ],
    )
}

/// A 64 MiB disk mostly of random bytes (so blobs are as large as the data), in three layers:
/// a base and two diffs rewriting scattered 1 MiB pieces. Returns (config, raw reference).
fn dense_image(t: &Path) -> (PathBuf, PathBuf) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut data = vec![0u8; 64 << 20];
    rng.fill(&mut data[..56 << 20]);
    let raw = t.join("ref.raw");
    let img = t.join("img.json");
    for l in 0..3 {
        if l > 0 {
            for _ in 0..6 {
                let m = rng.gen_range(0..64usize) << 20;
                rng.fill(&mut data[m..m + (1 << 20)]);
            }
        }
        std::fs::write(&raw, &data).expect("write raw");
        let blob = t.join(format!("layer{l}.blob"));
        let mut c = lsmctl(["import", "-q"]);
        c.arg(&raw).arg("-o").arg(&blob);
        if l > 0 {
            c.arg("--base").arg(&img).arg("--add-to").arg(&img);
        }
        ok(&mut c);
        if l == 0 {
            ok(lsmctl(["create"]).arg(&img).arg("--layer").arg(&blob));
        }
    }
    (img, raw)
}

fn sum_blob_bytes(t: &Path) -> u64 {
    (0..3)
        .map(|i| {
            std::fs::metadata(t.join(format!("layer{i}.blob")))
                .expect("blob")
                .len()
        })
        .sum()
}

#[test]
fn lazy_fetch_cache_restart_bound_and_damage() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let (img, raw) = dense_image(t);
    let reg = Registry::start(&t.join("registry"), None);
    let remote = remote_config(t, &img, &reg, false);
    let blob_bytes = sum_blob_bytes(t);
    let sock = t.join("lsmd.sock");
    let cache = t.join("cache");
    let port = free_port();

    // Cold: read 1% of the disk; the registry serves about that share of the blobs.
    let d = serve(&sock, &remote, &cache, "1G", port);
    let opened = metric(port, "lsm_source_bytes_total{source=\"registry\"}");
    ok(Command::new("qemu-io").args(["-f", "raw", "-r", "-c", "read 20M 655360", &d.uri()]));
    let fetched = metric(port, "lsm_source_bytes_total{source=\"registry\"}") - opened;
    eprintln!(
        "opening fetched {opened} bytes (metadata); reading 1% of the disk fetched {fetched} \
         of {blob_bytes} blob bytes ({:.2} %)",
        100.0 * fetched / blob_bytes as f64
    );
    assert!(
        fetched > 0.0 && fetched < 0.03 * blob_bytes as f64,
        "{fetched}"
    );

    // The whole disk equals the reference.
    let copy = t.join("copy.raw");
    ok(Command::new("nbdcopy").arg(d.uri()).arg(&copy));
    assert_eq!(sha256_file(&copy), sha256_file(&raw));
    let cached = metric(port, "lsm_cache_bytes");
    assert!(cached > 0.0);
    d.kill9();

    // Restart on the same cache: only the layer metadata is fetched again, no chunk.
    let d = serve(&sock, &remote, &cache, "1G", port);
    let opened2 = metric(port, "lsm_source_bytes_total{source=\"registry\"}");
    ok(Command::new("nbdcopy").arg(d.uri()).arg(&copy));
    assert_eq!(sha256_file(&copy), sha256_file(&raw));
    assert_eq!(
        metric(port, "lsm_source_bytes_total{source=\"registry\"}"),
        opened2,
        "chunks refetched after restart"
    );
    assert!(metric(port, "lsm_cache_hits_total") > 0.0);
    let status = ok(&mut lsmctl([
        "status",
        "--metrics",
        &format!("127.0.0.1:{port}"),
    ]));
    assert!(
        status.contains("export remote") && status.contains("chunks"),
        "{status}"
    );
    d.terminate();

    // A damaged cache entry is detected, dropped and fetched again; data stays right.
    let entry = walk_files(&cache)
        .into_iter()
        .find(|p| !p.starts_with(cache.join("tmp")))
        .expect("an entry");
    let mut b = std::fs::read(&entry).expect("entry");
    let n = b.len();
    b[n - 10] ^= 0x55;
    std::fs::write(&entry, b).expect("damage");
    let d = serve(&sock, &remote, &cache, "1G", port);
    ok(Command::new("nbdcopy").arg(d.uri()).arg(&copy));
    assert_eq!(sha256_file(&copy), sha256_file(&raw));
    assert!(
        metric(port, "lsm_cache_discarded_total") >= 1.0,
        "damaged entry not noticed"
    );
    d.terminate();

    // A bound smaller than the image: usage stays under it, reads stay right.
    let small = t.join("small-cache");
    let d = serve(&sock, &remote, &small, "2M", port);
    ok(Command::new("nbdcopy").arg(d.uri()).arg(&copy));
    assert_eq!(sha256_file(&copy), sha256_file(&raw));
    assert!(metric(port, "lsm_cache_bytes") <= 2.0 * 1048576.0);
    assert!(metric(port, "lsm_cache_evictions_total") > 0.0);
    let du: u64 = walk_files(&small)
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    assert!(du <= 2 << 20, "cache files hold {du} bytes");
    d.terminate();
}

fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn basic_auth_registry_restart_and_a_damaged_blob() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let (img, raw) = dense_image(t);
    let mut reg = Registry::start(&t.join("registry"), Some(("lsm", "s3cret")));
    let remote = remote_config(t, &img, &reg, true);
    let sock = t.join("lsmd.sock");
    let port = free_port();

    // Without credentials the daemon refuses to start, saying why.
    let anon = t.join("anon.json");
    rewrite_layers(&remote, &anon, |l| {
        let r = l["source"]["registry"].as_object_mut().expect("registry");
        r.remove("username");
        r.remove("password");
    });
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&remote).expect("read")).expect("json");
    let o = run(Command::new(bin("lsmd"))
        .args(["serve", "--config"])
        .arg(&anon)
        .arg("--socket")
        .arg(t.join("x.sock"))
        .env("HOME", t));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("401"), "{err}");

    // With them: the registry goes away in the middle of a whole-disk copy and comes back;
    // the copy stalls, then completes with the right bytes.
    let d = serve(&sock, &remote, &t.join("cache"), "1G", port);
    let uri = d.uri();
    let copy = t.join("copy.raw");
    let c2 = copy.clone();
    let reader = std::thread::spawn(move || run(Command::new("nbdcopy").arg(&uri).arg(&c2)));
    std::thread::sleep(std::time::Duration::from_millis(150));
    reg.stop();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    reg.resume();
    let o = reader.join().expect("reader");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(sha256_file(&copy), sha256_file(&raw));
    eprintln!(
        "registry restart: {} fetch errors, {} retry rounds",
        metric(port, "lsm_source_errors_total{source=\"registry\"}"),
        metric(port, "lsm_source_retries_total{source=\"registry\"}")
    );
    d.terminate();

    // Flipped bytes in a blob in the registry: reads of it fail with an I/O error naming the
    // blob digest; never other data.
    let top = v["layers"][2]["digest"]
        .as_str()
        .expect("digest")
        .to_string();
    let f = reg.blob_file(&top);
    let mut b = std::fs::read(&f).expect("blob");
    for i in (100..b.len().saturating_sub(4096)).step_by(997) {
        b[i] ^= 0xff;
    }
    std::fs::write(&f, b).expect("damage");
    let d = serve(&sock, &remote, &t.join("cold-cache"), "1G", port);
    let o = run(Command::new("nbdcopy").arg(d.uri()).arg(&copy));
    assert!(!o.status.success(), "a copy over a damaged blob succeeded");
    let log = d.log();
    assert!(log.contains(&top) && log.contains("corrupt"), "{log}");
}

#[test]
fn bearer_tokens_are_fetched_and_refreshed_when_they_expire() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let (img, raw) = dense_image(t);
    let mut reg = Registry::start(&t.join("registry"), None);
    let remote = remote_config(t, &img, &reg, false);
    // Tokens live 2 s; the registry now wants one on every request.
    let issuer = reg.use_token_auth(2);
    let o = run(Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("{}/v2/", reg.url)));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "401",
        "the registry does not ask for a token"
    );

    let sock = t.join("lsmd.sock");
    let port = free_port();
    let d = serve(&sock, &remote, &t.join("cache"), "1G", port);
    let first = issuer.issued();
    assert!(first >= 1, "no token was fetched");
    // Read the disk in slices spread over > 2 token lifetimes: expired tokens get refreshed.
    let copy = t.join("copy.raw");
    for i in 0..4 {
        std::thread::sleep(std::time::Duration::from_millis(1600));
        let cmd = format!("read {}M 16M", i * 16);
        ok(Command::new("qemu-io").args(["-f", "raw", "-r", "-c", &cmd, &d.uri()]));
    }
    assert!(
        issuer.issued() > first,
        "tokens were not refreshed ({first} issued)"
    );
    ok(Command::new("nbdcopy").arg(d.uri()).arg(&copy));
    assert_eq!(sha256_file(&copy), sha256_file(&raw));
    eprintln!("bearer: {} tokens issued over the run", issuer.issued());
    d.terminate();
}

/// Writes `out`: `config` with `edit` applied to every layer and an upper layer of its own.
fn rewrite_layers(config: &Path, out: &Path, mut edit: impl FnMut(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(config).expect("read")).expect("json");
    for l in v["layers"].as_array_mut().expect("layers") {
        edit(l);
    }
    v["upper"] = format!("{}.upper", out.display()).into();
    std::fs::write(out, v.to_string()).expect("write");
}

/// Points every registry layer of `config` at `url`, with `mirrors` behind it; writes `out`.
fn repoint(config: &Path, url: &str, mirrors: &[&str], out: &Path) {
    rewrite_layers(config, out, |l| {
        l["source"]["registry"]["url"] = url.into();
        l["source"]["registry"]["mirrors"] = mirrors.to_vec().into();
    });
}

#[test]
fn faults_in_flight_never_return_wrong_data_and_mirrors_take_over() {
    use lsm_e2e::faultproxy::{Fault, FaultProxy};
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let (img, raw) = dense_image(t);
    let reg = Registry::start(&t.join("registry"), None);
    let remote = remote_config(t, &img, &reg, false);
    let sock = t.join("lsmd.sock");
    let port = free_port();
    let copy = t.join("copy.raw");

    // Error bursts, bodies cut mid-way and bodies shorter than their range, while the whole
    // disk is copied: every fault is met, the copy is exact.
    let proxy = FaultProxy::start(reg.url.trim_start_matches("http://"));
    let faulty = t.join("faulty.json");
    repoint(&remote, &proxy.url, &[], &faulty);
    let d = serve(&sock, &faulty, &t.join("cache1"), "1G", port);
    let faults = [
        Fault::Status(500),
        Fault::Status(503),
        Fault::Status(500),
        Fault::CutBody,
        Fault::ShortBody,
        Fault::Status(503),
        Fault::Status(429),
        Fault::CutBody,
        Fault::ShortBody,
        Fault::CutBody,
    ];
    proxy.inject(&faults);
    ok(Command::new("nbdcopy").arg(d.uri()).arg(&copy));
    assert_eq!(sha256_file(&copy), sha256_file(&raw));
    assert_eq!(proxy.pending(), 0, "not every fault was met");
    assert!(metric(port, "lsm_source_errors_total{source=\"registry\"}") >= faults.len() as f64);
    d.terminate();

    // A primary that only answers 503: the mirror serves everything.
    let dead = FaultProxy::start(reg.url.trim_start_matches("http://"));
    dead.inject(&[Fault::Status(503); 100_000]);
    let mirrored = t.join("mirrored.json");
    repoint(&remote, &dead.url, &[&reg.url], &mirrored);
    let d = serve(&sock, &mirrored, &t.join("cache2"), "1G", port);
    ok(Command::new("nbdcopy").arg(d.uri()).arg(&copy));
    assert_eq!(sha256_file(&copy), sha256_file(&raw));
    assert!(d.log().contains("failed over"), "{}", d.log());
    d.terminate();
}

#[test]
fn p2p_agent_proxy_carries_aligned_pieces_and_its_failure_falls_back() {
    use lsm_e2e::squid::Squid;
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let (img, raw) = dense_image(t);
    let reg = Registry::start(&t.join("registry"), None);
    let remote = remote_config(t, &img, &reg, false);
    let mut squid = Squid::start(&t.join("squid"));
    let p2p = t.join("p2p.json");
    rewrite_layers(&remote, &p2p, |l| {
        l["source"]["registry"]["p2p"] =
            serde_json::json!({ "proxy": squid.url, "piece_size": 1048576 });
    });
    let sock = t.join("lsmd.sock");
    let port = free_port();
    let copy = t.join("copy.raw");

    let d = serve(&sock, &p2p, &t.join("cache1"), "1G", port);
    ok(Command::new("nbdcopy").arg(d.uri()).arg(&copy));
    assert_eq!(sha256_file(&copy), sha256_file(&raw));
    d.terminate();
    let log = squid.access_log();
    let carried = log.lines().filter(|l| l.contains("/blobs/sha256:")).count();
    assert!(carried > 0, "the agent carried no blob request:\n{log}");

    // The agent is down: lsmd says so and reads straight from the registry.
    squid.stop();
    let d = serve(&sock, &p2p, &t.join("cache2"), "1G", port);
    ok(Command::new("nbdcopy").arg(d.uri()).arg(&copy));
    assert_eq!(sha256_file(&copy), sha256_file(&raw));
    assert!(
        d.log().contains("falling back to the registry"),
        "{}",
        d.log()
    );
    d.terminate();
}

#[test]
fn plain_http_urls_that_honour_range_are_a_source() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let (img, raw) = dense_image(t);
    let reg = Registry::start(&t.join("registry"), None);
    let remote = remote_config(t, &img, &reg, false);
    // The same blobs, named by URL only (as an object store's public or presigned URLs).
    let http = t.join("http.json");
    rewrite_layers(&remote, &http, |l| {
        let digest = l["digest"].as_str().expect("digest").to_string();
        let url = format!("{}/v2/lsm/test/blobs/{digest}", reg.url);
        l["source"] = serde_json::json!({ "http": { "url": url, "insecure": true } });
    });
    let d = Lsmd::start(
        &t.join("lsmd.sock"),
        &[OsStr::new("--config"), http.as_os_str()],
    );
    let copy = t.join("copy.raw");
    ok(Command::new("nbdcopy").arg(d.uri()).arg(&copy));
    assert_eq!(sha256_file(&copy), sha256_file(&raw));
    d.terminate();
}

/// Reads a fixed "startup" set — 200 scattered 4 KiB reads, one after another — and returns
/// how long it took.
fn startup(uri: &str) -> std::time::Duration {
    let mut args = vec!["-f".to_string(), "raw".into(), "-r".into()];
    let mut x = 0x1234_5678_9abc_def1u64;
    for _ in 0..200 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        args.push("-c".into());
        args.push(format!("read {} 4k", (x % (56 << 20)) / 4096 * 4096));
    }
    args.push(uri.to_string());
    let t0 = std::time::Instant::now();
    ok(Command::new("qemu-io").args(&args));
    t0.elapsed()
}

#[test]
fn a_recorded_startup_trace_is_replayed_first_on_the_next_start() {
    use lsm_e2e::faultproxy::FaultProxy;
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let (img, _) = dense_image(t);
    let reg = Registry::start(&t.join("registry"), None);
    let remote = remote_config(t, &img, &reg, false);
    // A registry 5 ms away.
    let far = FaultProxy::start(reg.url.trim_start_matches("http://"));
    let config = t.join("far.json");
    repoint(&remote, &far.url, &[], &config);
    far.set_latency(std::time::Duration::from_millis(5));
    let sock = t.join("lsmd.sock");
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let start = |cache: &str, prefetch: &str| {
        Lsmd::start(
            &sock,
            &[
                OsStr::new("--config"),
                config.as_os_str(),
                OsStr::new("--cache-dir"),
                t.join(cache).as_os_str(),
                OsStr::new("--metrics"),
                OsStr::new(&metrics),
                OsStr::new("--prefetch"),
                OsStr::new(prefetch),
            ],
        )
    };

    // First start: nothing to replay; record what the startup read.
    let d = start("cache-a", "trace");
    let cold = startup(&d.uri());
    let rec = ok(lsmctl(["trace", "record", "--metrics", &metrics]).arg(&config));
    assert!(rec.contains("chunks"), "{rec}");
    d.terminate();
    let trace = std::fs::read(t.join("far.json.trace")).expect("trace file");
    let parsed = lsmd::trace::Trace::decode(&trace).expect("trace parses");
    assert!(
        parsed.entries.len() >= 100,
        "{} chunks traced",
        parsed.entries.len()
    );

    // Next start, empty cache again: the trace is fetched first, in parallel.
    let d = start("cache-b", "trace");
    let warm = startup(&d.uri());
    assert!(
        d.log().contains("replaying the startup trace"),
        "{}",
        d.log()
    );
    d.terminate();
    eprintln!(
        "startup of 200 scattered reads over a registry 5 ms away: {:.0} ms cold, {:.0} ms with \
         the trace replayed ({:.1}x; {} chunks traced)",
        cold.as_secs_f64() * 1e3,
        warm.as_secs_f64() * 1e3,
        cold.as_secs_f64() / warm.as_secs_f64(),
        parsed.entries.len()
    );
}

/// Merged fetches against a real registry: reading the disk in large sequential requests
/// fetches neighbouring cold chunks together (far fewer GETs than chunks), and every byte is
/// the reference's; a restart on a cold cache reading 4 KiB pieces one after another (a
/// sequential reader the kernel would send) widens its fetches too.
#[test]
fn neighbouring_cold_chunks_are_fetched_with_one_ranged_get() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let (img, raw) = dense_image(t);
    let reg = Registry::start(&t.join("registry"), None);
    let remote = remote_config(t, &img, &reg, false);
    let sock = t.join("lsmd.sock");
    let port = free_port();
    let requests = || metric(port, "lsm_source_requests_total{source=\"registry\"}");
    let bytes = || metric(port, "lsm_source_bytes_total{source=\"registry\"}");

    let d = serve(&sock, &remote, &t.join("cache-a"), "1G", port);
    let (r0, b0) = (requests(), bytes());
    let copy = t.join("copy.raw");
    ok(Command::new("nbdcopy").arg(d.uri()).arg(&copy));
    assert_eq!(sha256_file(&copy), sha256_file(&raw));
    let (gets, fetched) = (requests() - r0, bytes() - b0);
    // Random data does not compress: a stored chunk is about its 128 KiB window.
    let chunks = fetched / 131072.0;
    eprintln!("whole disk: {gets} GETs for about {chunks:.0} chunks ({fetched} bytes)");
    assert!(gets * 4.0 <= chunks, "{gets} GETs for {chunks:.0} chunks");
    d.terminate();

    // 4 KiB reads one after another over 4 MiB: a sequential stream, widened (the bytes are
    // checked by the whole-disk copy after).
    let d = serve(&sock, &remote, &t.join("cache-b"), "1G", port);
    let r0 = requests();
    let mut args = vec!["-f".to_string(), "raw".into(), "-r".into()];
    for i in 0..1024u64 {
        args.push("-c".into());
        args.push(format!("read {} 4k", (30 << 20) + i * 4096));
    }
    args.push(d.uri());
    ok(Command::new("qemu-io").args(&args));
    let gets = requests() - r0;
    eprintln!("4 MiB in sequential 4 KiB reads: {gets} GETs for 32 chunks");
    // Windows 1, 2, 4, 8, 16 chunks per stream, restarted where a diff layer covers a piece.
    assert!(gets <= 12.0, "{gets} GETs for 32 chunks");
    ok(Command::new("nbdcopy").arg(d.uri()).arg(&copy));
    assert_eq!(sha256_file(&copy), sha256_file(&raw));
    d.terminate();
}

/// Lazy start of an ext4 image (mounted through the FUSE file and a loop device with lsm's
/// 128 KiB readahead) from a real registry, page faults here and there in a few multi-chunk
/// "programs", as a start faults in its binary and libraries: returns lsmd's registry GETs for
/// it, after checking every byte read against the tree and every file's sha256.
fn lazy_start_gets(t: &Path, tag: &str, config: &Path, tree: &Path, extra: &[&str]) -> f64 {
    use std::os::unix::fs::FileExt;
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let cache = t.join(format!("cache-{tag}"));
    let files = t.join(format!("files-{tag}"));
    let mut args = vec![
        OsStr::new("--read-only"),
        OsStr::new("--cache-dir"),
        cache.as_os_str(),
        OsStr::new("--metrics"),
        OsStr::new(&metrics),
    ];
    args.extend(extra.iter().map(OsStr::new));
    let arg = format!("img={}", config.display());
    let d = Lsmd::start_fuse(
        &t.join(format!("lsmd-{tag}.sock")),
        OsStr::new(&arg),
        &files,
        &args,
    );
    // The start begins once lsmd has mapped the files (the inode tables are in).
    for _ in 0..400 {
        if d.log().contains("files mapped for fetching ahead") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    assert!(d.log().contains("files mapped"), "{}", d.log());
    let m = lsm_e2e::tree::Mounted::with(&files.join("img"), &t.join(format!("mnt-{tag}")), true);
    let dev = m.loopdev.trim_start_matches("/dev/");
    std::fs::write(format!("/sys/block/{dev}/queue/read_ahead_kb"), "128").expect("readahead");
    let requests = || metric(port, "lsm_source_requests_total{source=\"registry\"}");
    let r0 = requests();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for p in 0..6 {
        let name = format!("bin/prog{p}");
        let want = std::fs::read(tree.join(&name)).expect("tree file");
        let f = std::fs::File::open(m.dir.join(&name)).expect("open");
        // The header first (as a loader reads it), then 40 pages anywhere in the file.
        let mut page = vec![0u8; 4096];
        for i in 0..41 {
            let at = match i {
                0 => 0,
                _ => {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % (want.len() as u64 / 4096)) * 4096
                }
            };
            f.read_exact_at(&mut page, at).expect("pread");
            assert!(
                page[..] == want[at as usize..at as usize + 4096],
                "{name} at {at}"
            );
        }
    }
    let gets = requests() - r0;
    for p in 0..6 {
        let name = format!("bin/prog{p}");
        assert_eq!(
            sha256_file(&m.dir.join(&name)),
            sha256_file(&tree.join(&name))
        );
    }
    drop(m);
    d.terminate();
    gets
}

/// Fetching ahead in files, against a real registry and the real kernel: an ext4 image of six
/// 1.5–4 MiB programs and a few hundred small files, converted, pushed and served lazily. The
/// start that faults in 41 pages of each program makes far fewer GETs when lsmd, having read
/// the inode tables at open, fetches the rest of a file beside a miss in it (`--file-ahead-kb 2048`)
/// than with that off (`--file-ahead-kb 0`, the default), and reads the same bytes.
#[test]
fn a_lazy_start_fetches_ahead_in_its_files_with_fewer_gets() {
    use rand::{Rng, SeedableRng};
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let tree = t.join("tree");
    let mut rng = rand::rngs::StdRng::seed_from_u64(18);
    std::fs::create_dir_all(tree.join("bin")).expect("mkdir");
    for p in 0..6 {
        // Compressible like code (six bits of entropy a byte), 1.5–4 MiB.
        let len = (3 << 19) + p * (1 << 19);
        let data: Vec<u8> = (0..len).map(|_| rng.gen::<u8>() & 0x3f).collect();
        std::fs::write(tree.join(format!("bin/prog{p}")), data).expect("write");
    }
    for d in 0..20 {
        let dir = tree.join(format!("lib/d{d}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        for f in 0..20 {
            let data: Vec<u8> = (0..rng.gen_range(100..9000)).map(|_| rng.gen()).collect();
            std::fs::write(dir.join(format!("f{f}.py")), data).expect("write");
        }
    }
    let raw = t.join("fs.raw");
    mkfs_ext4(&raw, 96, &tree);
    let blob = t.join("base.blob");
    ok(lsmctl(["import", "-q"]).arg(&raw).arg("-o").arg(&blob));
    let img = t.join("img.json");
    ok(lsmctl(["create"]).arg(&img).arg("--layer").arg(&blob));
    let reg = Registry::start(&t.join("registry"), None);
    let remote = remote_config(t, &img, &reg, false);

    let off = lazy_start_gets(t, "off", &remote, &tree, &["--file-ahead-kb", "0"]);
    let ahead = lazy_start_gets(t, "ahead", &remote, &tree, &["--file-ahead-kb", "2048"]);
    eprintln!("lazy start, 6 programs × 41 pages: {off} GETs without fetching ahead in files, {ahead} with");
    assert!(
        ahead * 2.0 <= off,
        "{ahead} GETs with file-ahead, {off} without"
    );
}

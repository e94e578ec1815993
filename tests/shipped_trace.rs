//! A startup trace shipped inside the image (`lsmctl trace bake`), against a real registry:
//! baked by running a command once over the image (lsmd FUSE file, loop device, read-only
//! ext4 mount, chroot + unshare), pushed as a blob beside the layers and named with its digest
//! in the config; a cold lsmd fetches it, checks the digest and prefetches by it; a tampered
//! blob in the registry is refused, and lsmd serves lazily and says so (log and metrics).
//! With it, a startup layer (FORMAT.md §9: the blocks the command read, packed): stacked on a
//! cold node for fewer bytes than the trace alone, refused when tampered or not bound to the
//! image's layer chain.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use lsm_e2e::nbd::*;
use lsm_e2e::registry::Registry;
use lsm_e2e::*;

/// Copies `bin` and the shared libraries `ldd` names into `root` at the same paths.
fn copy_with_libs(bin: &str, root: &Path) {
    let ldd = ok(Command::new("ldd").arg(bin));
    let libs = ldd
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(str::to_string);
    for f in std::iter::once(bin.to_string()).chain(libs) {
        let dst = root.join(f.trim_start_matches('/'));
        std::fs::create_dir_all(dst.parent().expect("parent")).expect("mkdir");
        std::fs::copy(&f, &dst).expect("copy");
    }
}

/// An ext4 disk with a shell, `cat`, `dd`, `sleep`, /dev, /proc and 8 data files of 2 MiB of
/// random bytes (from `seed`): a tiny root filesystem.
/// Returns (raw disk, local image config).
fn rootfs_image(t: &Path, seed: u64) -> (PathBuf, PathBuf) {
    use rand::{Rng, SeedableRng};
    let root = t.join("root");
    copy_with_libs("/bin/dash", &root);
    copy_with_libs("/bin/cat", &root);
    copy_with_libs("/bin/sleep", &root);
    copy_with_libs("/bin/dd", &root);
    std::fs::rename(root.join("bin/dash"), root.join("bin/sh")).expect("sh");
    for d in ["data", "dev", "proc"] {
        std::fs::create_dir_all(root.join(d)).expect("dir");
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for name in "abcdefgh".chars() {
        let mut b = vec![0u8; 2 << 20];
        rng.fill(&mut b[..]);
        std::fs::write(root.join("data").join(name.to_string()), b).expect("file");
    }
    let raw = t.join("disk.raw");
    mkfs_ext4(&raw, 64, &root);
    let blob = t.join("layer.blob");
    ok(lsmctl(["import", "-q"]).arg(&raw).arg("-o").arg(&blob));
    let img = t.join("img.json");
    ok(lsmctl(["create"]).arg(&img).arg("--layer").arg(&blob));
    (raw, img)
}

/// Pushes the layer to `reg` and writes `remote.json` reading it from there; tags an image
/// `lsm/shipped:1` whose manifest lists the layer blob (with the OCI layer media type and role
/// annotation, as `convert --push` writes it) and whose config has its diff_id.
fn push_layers(t: &Path, img: &Path, reg: &Registry) -> PathBuf {
    let mut c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(img).expect("config")).expect("json");
    let mut descs = Vec::new();
    for l in c["layers"].as_array_mut().expect("layers") {
        let path = t.join(l["source"]["local"].as_str().expect("local"));
        let blob = std::fs::read(path).expect("blob");
        let digest = reg.push_blob("lsm/shipped", &blob);
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest,
            "size": blob.len(), "annotations": { "io.lsm.layer.role": "layer" } }));
        l["source"] = serde_json::json!({ "registry": {
            "url": reg.url, "repository": "lsm/shipped", "insecure": true } });
    }
    let diff_ids: Vec<_> = descs.iter().map(|d| d["digest"].clone()).collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
        "history": [{ "created_by": "lsm: layer" }] }))
    .expect("json");
    let cfg_digest = reg.push_blob("lsm/shipped", &config);
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": cfg_digest, "size": config.len() },
        "layers": descs });
    ureq::put(&format!("{}/v2/lsm/shipped/manifests/1", reg.url))
        .set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        .send_bytes(&serde_json::to_vec(&manifest).expect("json"))
        .expect("put manifest");
    let out = t.join("remote.json");
    std::fs::write(&out, serde_json::to_vec_pretty(&c).expect("json")).expect("write");
    out
}

fn get_json(url: &str) -> serde_json::Value {
    ureq::get(url)
        .set("Accept", "application/vnd.oci.image.manifest.v1+json")
        .call()
        .expect(url)
        .into_string()
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .expect("json")
}

/// The manifest of `lsm/shipped:1` lists the trace `digest` once, as a layer with role
/// `trace`, and its config's diff_ids and history match the layers one for one.
fn assert_manifest_lists_trace(reg: &Registry, digest: &str) {
    let m = get_json(&format!("{}/v2/lsm/shipped/manifests/1", reg.url));
    let layers = m["layers"].as_array().expect("layers");
    let traces: Vec<_> = layers
        .iter()
        .filter(|l| l["annotations"]["io.lsm.layer.role"] == "trace")
        .collect();
    assert_eq!(traces.len(), 1, "{m}");
    let tr = traces[0];
    assert_eq!(tr["digest"].as_str(), Some(digest));
    assert_eq!(tr["mediaType"], "application/vnd.oci.image.layer.v1.tar");
    assert_eq!(
        tr["annotations"]["containerd.io/snapshot/lsm.role"],
        "trace"
    );
    let cfg_digest = m["config"]["digest"].as_str().expect("config digest");
    let c = get_json(&format!("{}/v2/lsm/shipped/blobs/{cfg_digest}", reg.url));
    let diff_ids: Vec<&str> = c["rootfs"]["diff_ids"]
        .as_array()
        .expect("diff_ids")
        .iter()
        .filter_map(|d| d.as_str())
        .collect();
    let digests: Vec<&str> = layers.iter().filter_map(|l| l["digest"].as_str()).collect();
    assert_eq!(diff_ids, digests, "config {c}");
    assert_eq!(c["history"].as_array().map(Vec::len), Some(layers.len()));
}

fn metric(port: u16, name: &str) -> f64 {
    let text = ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
        .call()
        .expect("metrics")
        .into_string()
        .expect("text");
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in metrics:\n{text}"))
}

/// lsmd on `config` with an empty cache, until its background prefetch is over (or there was
/// nothing to prefetch: `expect_prefetch` false).
fn serve_cold(t: &Path, config: &Path, cache: &str, port: u16, expect_prefetch: bool) -> Lsmd {
    let metrics = format!("127.0.0.1:{port}");
    // A socket (and so a log) per run: each run's log is its own.
    let d = Lsmd::start(
        &t.join(format!("lsmd-{cache}.sock")),
        &[
            OsStr::new("--config"),
            config.as_os_str(),
            OsStr::new("--cache-dir"),
            t.join(cache).as_os_str(),
            OsStr::new("--metrics"),
            OsStr::new(&metrics),
        ],
    );
    let t0 = std::time::Instant::now();
    let done = |log: &str| match expect_prefetch {
        true => log.contains("prefetch done"),
        false => log.contains("serving lazily"),
    };
    while !done(&d.log()) {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(60),
            "{}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    d
}

#[test]
fn a_baked_trace_is_shipped_verified_and_used_and_a_tampered_one_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let (raw, img) = rootfs_image(t, 18);
    let reg = Registry::start(&t.join("registry"), None);
    let remote = push_layers(t, &img, &reg);

    // Bake: the command reads two of the eight files; the pushed image's manifest lists the
    // trace. Baked again (another command), the new trace replaces the old in the manifest.
    let image_ref = format!("{}/lsm/shipped:1", reg.url);
    let bake = |cmd: &str| {
        ok(lsmctl([
            "trace",
            "bake",
            "--no-startup-layer",
            "--image-ref",
            &image_ref,
        ])
        .arg(&remote)
        .args(["--", cmd]))
    };
    let out = bake("cat /data/a >/dev/null");
    assert!(out.contains("trace sha256:"), "{out}");
    let first: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&remote).expect("config")).expect("json");
    assert_manifest_lists_trace(&reg, first["trace"]["digest"].as_str().expect("digest"));
    let out = bake("cat /data/c /data/f >/dev/null");
    assert!(out.contains("trace sha256:"), "{out}");
    let c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&remote).expect("config")).expect("json");
    let digest = c["trace"]["digest"]
        .as_str()
        .expect("trace digest")
        .to_string();
    assert_ne!(first["trace"]["digest"], c["trace"]["digest"]);
    assert_manifest_lists_trace(&reg, &digest);
    assert_eq!(
        c["trace"]["source"]["registry"]["repository"].as_str(),
        Some("lsm/shipped"),
        "{c}"
    );
    let blob = ureq::get(&format!("{}/v2/lsm/shipped/blobs/{digest}", reg.url))
        .call()
        .expect("the trace blob is in the registry");
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut blob.into_reader(), &mut bytes).expect("read");
    let trace = lsmd::trace::Trace::decode(&bytes).expect("a trace");
    // Two 2 MiB files are 32 chunks of 128 KiB, plus the filesystem's metadata.
    assert!(trace.entries.len() >= 32, "{} chunks", trace.entries.len());

    // Cold node: the shipped trace is fetched, checked, replayed in full.
    let port = free_port();
    let d = serve_cold(t, &remote, "cache-a", port, true);
    assert!(
        d.log()
            .contains("replaying the startup trace shipped in the image"),
        "{}",
        d.log()
    );
    assert_eq!(
        metric(port, "lsm_trace_total{trace=\"shipped\",result=\"used\"}"),
        1.0
    );
    assert_eq!(
        metric(port, "lsm_prefetch_chunks_total"),
        trace.entries.len() as f64
    );
    // Prefetched into the host cache: reading the traced chunks now costs no fetch.
    let fetched = metric(port, "lsm_source_requests_total{source=\"registry\"}");
    assert!(metric(port, "lsm_cache_entries") >= trace.entries.len() as f64);
    let copy = t.join("copy.raw");
    ok(Command::new("nbdcopy").arg(d.uri()).arg(&copy));
    assert_eq!(sha256_file(&copy), sha256_file(&raw));
    assert!(metric(port, "lsm_source_requests_total{source=\"registry\"}") > fetched);
    d.terminate();

    // Tampered in the registry's storage (its digest no longer matches): refused, lazy.
    let data = t
        .join("registry/data/docker/registry/v2/blobs/sha256")
        .join(&digest[7..9])
        .join(&digest[7..])
        .join("data");
    let mut b = std::fs::read(&data).expect("stored trace blob");
    let n = b.len();
    b[n / 2] ^= 0x01;
    std::fs::write(&data, b).expect("tamper");
    let d = serve_cold(t, &remote, "cache-b", port, false);
    let log = d.log();
    assert!(
        log.contains("refusing the startup trace shipped in the image") && log.contains("digest"),
        "{log}"
    );
    assert_eq!(
        metric(
            port,
            "lsm_trace_total{trace=\"shipped\",result=\"refused\"}"
        ),
        1.0
    );
    // Nothing of the trace is used (what lazy serving prefetches, the ext4 inode tables, may
    // still come in).
    assert_eq!(
        metric(port, "lsm_trace_total{trace=\"shipped\",result=\"used\"}"),
        0.0
    );
    assert_serves_the_image(d, &copy, &raw);
}

/// The loop device `trace bake` runs the command over has lsm's readahead (128 KiB; the
/// kernel gives a loop device 2560 KiB, and what it reads ahead would be in the trace and
/// fetched by every node), or what `--read-ahead-kb` asks for. Seen from outside while the
/// command waits for a file in the host's /dev/shm to go (the sandbox binds the host's /dev).
#[test]
fn bake_runs_the_command_over_a_loop_device_with_lsms_readahead() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let (_raw, img) = rootfs_image(t, 18);
    for (args, want) in [(vec![], 128u32), (vec!["--read-ahead-kb", "256"], 256)] {
        // The command waits while this file exists in the host's /dev/shm.
        let hold = PathBuf::from(format!(
            "/dev/shm/lsm-bake-test-{}-{want}",
            std::process::id()
        ));
        std::fs::write(&hold, b"").expect("hold file");
        // Lets the command finish whatever happens below.
        struct Release(PathBuf);
        impl Drop for Release {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        let release = Release(hold.clone());
        let cmd = format!(
            "cat /data/a >/dev/null; while [ -e {} ]; do sleep 0.05; done",
            hold.display()
        );
        let mut bake = lsmctl(["trace", "bake", "--timeout", "120"])
            .args(&args)
            .arg(&img)
            .args(["--", &cmd])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("lsmctl trace bake");
        let sandbox = format!("lsmctl-bake-{}/", bake.id());
        let t0 = std::time::Instant::now();
        let dev = loop {
            let list = ok(Command::new("losetup").args(["-n", "-O", "NAME,BACK-FILE"]));
            if let Some(l) = list.lines().find(|l| l.contains(&sandbox)) {
                break l.split_whitespace().next().expect("name").to_string();
            }
            assert!(
                bake.try_wait().expect("wait").is_none(),
                "bake ended before its loop device was seen"
            );
            assert!(t0.elapsed() < std::time::Duration::from_secs(60), "{list}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let name = dev.trim_start_matches("/dev/");
        let kb = std::fs::read_to_string(format!("/sys/block/{name}/queue/read_ahead_kb"))
            .expect("read_ahead_kb");
        assert_eq!(kb.trim().parse::<u32>().expect("number"), want, "{dev}");
        drop(release);
        let out = bake.wait_with_output().expect("bake");
        assert!(out.status.success(), "{out:?}");
    }
}

/// What a bake in `sandbox` (its directory) may have left: loop devices over a file in it,
/// mounts in it, processes naming it (its lsmd) or `marker` (the command's) in their command
/// line, the directory itself.
fn bake_leftovers(sandbox: &Path, marker: &str) -> Vec<String> {
    let dir = sandbox.to_string_lossy().into_owned();
    let mut left = Vec::new();
    let loops = ok(Command::new("losetup").args(["-n", "-O", "NAME,BACK-FILE"]));
    left.extend(
        loops
            .lines()
            .filter(|l| l.contains(&dir))
            .map(|l| format!("loop {l}")),
    );
    let mounts = std::fs::read_to_string("/proc/mounts").expect("mounts");
    left.extend(
        mounts
            .lines()
            .filter(|l| l.contains(&dir))
            .map(|l| format!("mount {l}")),
    );
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&dir) || cmdline.contains(marker) {
            left.push(format!(
                "process {}: {cmdline}",
                e.file_name().to_string_lossy()
            ));
        }
    }
    if sandbox.exists() {
        left.push(format!("directory {dir}"));
    }
    left
}

/// Waits (≤ 30 s) until nothing of the bake in `sandbox` is left, else fails naming what is.
fn assert_nothing_left(sandbox: &Path, marker: &str, what: &str) {
    let t0 = std::time::Instant::now();
    loop {
        let left = bake_leftovers(sandbox, marker);
        if left.is_empty() {
            return;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(30),
            "{what}: left behind: {left:#?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A bake that does not finish leaves nothing behind — no lsmd, loop device, mount, process
/// of the command or directory — whether its command fails, outlives `--timeout` (with a
/// process of its own in the background), or lsmctl is stopped by SIGTERM or SIGINT while the
/// command runs; killed outright (SIGKILL), its lsmd and the command still stop; and the
/// image's config is left as it was.
#[test]
fn a_failed_timed_out_or_interrupted_bake_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let (_raw, img) = rootfs_image(t, 19);
    let config_before = std::fs::read(&img).expect("config");
    // lsmctl's output goes to a file, not a pipe: a leaked process of the command would hold
    // a pipe open and hang the test instead of failing it.
    let err_file = t.join("bake.err");
    let bake = |cmd: &str, timeout: &str| {
        let err = std::fs::File::create(&err_file).expect("stderr file");
        let mut c = lsmctl(["trace", "bake", "--timeout", timeout]);
        c.env("TMPDIR", t)
            .arg(&img)
            .args(["--", cmd])
            .stdout(std::process::Stdio::null())
            .stderr(err);
        c.spawn().expect("lsmctl trace bake")
    };
    let finish = |mut child: std::process::Child| {
        let status = child.wait().expect("wait for lsmctl");
        (status, std::fs::read_to_string(&err_file).expect("stderr"))
    };
    // The command fails, a process of its own still running.
    let marker = format!("{}", 7000 + std::process::id() % 1000);
    // Should the test fail: what a leaky bake left is swept away, not left to other tests.
    struct Sweep(String, PathBuf);
    impl Drop for Sweep {
        fn drop(&mut self) {
            let _ = Command::new("pkill")
                .args(["-KILL", "-f"])
                .arg(format!("sleep {}", self.0))
                .status();
            let dir = self.1.to_string_lossy().into_owned();
            let _ = Command::new("pkill")
                .args(["-KILL", "-f"])
                .arg(&dir)
                .status();
            let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
            let mut mine: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split(' ').nth(1))
                .filter(|m| m.starts_with(&dir))
                .collect();
            mine.sort_unstable_by(|a, b| b.cmp(a));
            for m in mine {
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
        }
    }
    let _sweep = Sweep(marker.clone(), t.to_path_buf());
    let child = bake(
        &format!("cat /data/a >/dev/null; sleep {marker}1 & exit 3"),
        "120",
    );
    let sandbox = t.join(format!("lsmctl-bake-{}", child.id()));
    let (status, err) = finish(child);
    assert!(!status.success(), "{err}");
    assert!(err.contains("the command failed inside the image"), "{err}");
    assert_nothing_left(&sandbox, &format!("sleep {marker}1"), "a failed command");

    // The command outlives the timeout, with a process in the background.
    let child = bake(&format!("sleep {marker}2 & sleep {marker}3"), "2");
    let sandbox = t.join(format!("lsmctl-bake-{}", child.id()));
    let (status, err) = finish(child);
    assert!(!status.success(), "{err}");
    assert!(err.contains("ran longer than"), "{err}");
    assert_nothing_left(&sandbox, &format!("sleep {marker}"), "a timed-out command");

    // lsmctl stopped by a signal while the command runs.
    for (name, sig, n) in [("TERM", 15, 4), ("INT", 2, 5)] {
        let cmd = format!("cat /data/b >/dev/null; sleep {marker}{n}");
        let mut child = bake(&cmd, "600");
        let sandbox = t.join(format!("lsmctl-bake-{}", child.id()));
        let t0 = std::time::Instant::now();
        let running = format!("sleep {marker}{n}");
        while !bake_leftovers(&sandbox, &running)
            .iter()
            .any(|l| l.starts_with("process") && l.trim_end().ends_with(&format!(": {running}")))
        {
            assert!(
                child.try_wait().expect("wait").is_none(),
                "bake ended before its command ran"
            );
            assert!(t0.elapsed() < std::time::Duration::from_secs(60));
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        ok(Command::new("kill")
            .arg(format!("-{name}"))
            .arg(child.id().to_string()));
        let (status, err) = finish(child);
        assert_eq!(status.code(), Some(128 + sig), "{status}: {err}");
        assert!(err.contains("sandbox torn down"), "{err}");
        assert_nothing_left(&sandbox, &running, "an interrupted bake");
    }

    // lsmctl killed outright (SIGKILL): nothing of lsmctl runs, but the kernel stops its lsmd
    // and the command (PR_SET_PDEATHSIG). The mount and the loop device stay: removed here.
    let cmd = format!("cat /data/c >/dev/null; sleep {marker}6");
    let mut child = bake(&cmd, "600");
    let sandbox = t.join(format!("lsmctl-bake-{}", child.id()));
    let running = format!("sleep {marker}6");
    let t0 = std::time::Instant::now();
    while !bake_leftovers(&sandbox, &running)
        .iter()
        .any(|l| l.starts_with("process") && l.trim_end().ends_with(&format!(": {running}")))
    {
        assert!(
            child.try_wait().expect("wait").is_none(),
            "bake ended before its command ran"
        );
        assert!(t0.elapsed() < std::time::Duration::from_secs(60));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().expect("kill -9 lsmctl");
    child.wait().expect("wait");
    let t0 = std::time::Instant::now();
    loop {
        let procs: Vec<String> = bake_leftovers(&sandbox, &running)
            .into_iter()
            .filter(|l| l.starts_with("process"))
            .collect();
        if procs.is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(30),
            "lsmctl killed: processes left: {procs:#?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let mnt = sandbox.join("mnt");
    let _ = Command::new("umount").arg(&mnt).status();
    let loops = ok(Command::new("losetup").args(["-n", "-O", "NAME,BACK-FILE"]));
    let dir = sandbox.to_string_lossy().into_owned();
    for l in loops.lines().filter(|l| l.contains(&dir)) {
        if let Some(dev) = l.split_whitespace().next() {
            let _ = Command::new("losetup").args(["-d", dev]).status();
        }
    }
    let _ = Command::new("umount")
        .arg("-l")
        .arg(sandbox.join("files"))
        .status();
    assert_eq!(std::fs::read(&img).expect("config"), config_before);
}

/// The image config at `path` as JSON.
/// The whole disk `d` serves (copied to `copy` with nbdcopy) equals the image `raw`; then stops it.
fn assert_serves_the_image(d: Lsmd, copy: &Path, raw: &Path) {
    ok(Command::new("nbdcopy").arg(d.uri()).arg(copy));
    assert_eq!(sha256_file(copy), sha256_file(raw));
    d.terminate();
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).expect("config")).expect("json")
}

/// Writes `c` to `path`.
fn write_json(path: &Path, c: &serde_json::Value) {
    std::fs::write(path, serde_json::to_vec_pretty(c).expect("json")).expect("write");
}

/// Where the registry stores blob `digest`.
fn stored_blob(reg_dir: &Path, digest: &str) -> PathBuf {
    reg_dir
        .join("data/docker/registry/v2/blobs/sha256")
        .join(&digest[7..9])
        .join(&digest[7..])
        .join("data")
}

/// Waits (≤ 60 s) until `d`'s log holds `want`.
fn wait_for_log(d: &Lsmd, want: &str) {
    let t0 = std::time::Instant::now();
    while !d.log().contains(want) {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(60),
            "{want:?} not in {}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// lsmd on `config` with an empty cache (`cache`) until its prefetch is done and the log
/// holds `want`; returns it with the registry bytes it fetched by then.
fn serve_until(t: &Path, config: &Path, cache: &str, port: u16, want: &str) -> (Lsmd, f64) {
    let d = serve_cold(t, config, cache, port, true);
    // A startup layer refused for a chunk that failed is said after the prefetch that met it.
    wait_for_log(&d, want);
    let bytes = metric(port, "lsm_source_bytes_total{source=\"registry\"}");
    (d, bytes)
}

/// Reads 13 single 4 KiB blocks 160 KiB apart from one 2 MiB file: a start that touches a page
/// here and there of what it opens, as a program faulting in its binary does.
const SPARSE_READS: &str = "for k in 0 40 80 120 160 200 240 280 320 360 400 440 480; do \
    dd if=/data/b of=/dev/null bs=4k count=1 skip=$k 2>/dev/null; done";

#[test]
fn a_startup_layer_is_stacked_for_fewer_bytes_and_refused_when_tampered_or_not_bound() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let (raw, img) = rootfs_image(t, 18);
    let reg = Registry::start(&t.join("registry"), None);
    let remote = push_layers(t, &img, &reg);
    let image_ref = format!("{}/lsm/shipped:1", reg.url);
    let out = ok(lsmctl(["trace", "bake", "--image-ref", &image_ref])
        .arg(&remote)
        .args(["--", SPARSE_READS]));
    assert!(out.contains("startup layer sha256:"), "{out}");
    let c = read_json(&remote);
    let startup = c["startup"]["digest"]
        .as_str()
        .expect("startup digest")
        .to_string();
    assert!(c["startup"]["meta_digest"].is_string(), "{c}");
    let m = get_json(&format!("{}/v2/lsm/shipped/manifests/1", reg.url));
    let roles: Vec<&str> = m["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .filter_map(|l| l["annotations"]["io.lsm.layer.role"].as_str())
        .collect();
    assert_eq!(roles, ["layer", "trace", "startup"], "{m}");

    // Cold node: the startup layer is opened (metadata checked), bound, stacked and its chunks
    // prefetched, each checked; the disk reads as the image; fewer registry bytes than with
    // the trace alone (same trace, no `startup`).
    let port = free_port();
    let (d, with_startup) = serve_until(t, &remote, "cache-a", port, "stacking the startup layer");
    assert_eq!(
        metric(port, "lsm_trace_total{trace=\"startup\",result=\"used\"}"),
        1.0
    );
    let copy = t.join("copy.raw");
    assert_serves_the_image(d, &copy, &raw);
    let alone = t.join("trace-alone.json");
    let mut a = c.clone();
    a.as_object_mut().expect("object").remove("startup");
    write_json(&alone, &a);
    let (d, trace_alone) = serve_until(t, &alone, "cache-b", port, "replaying the startup trace");
    d.terminate();
    println!("registry bytes: startup layer {with_startup}, trace alone {trace_alone}");
    assert!(
        with_startup < trace_alone * 0.6,
        "registry bytes with the startup layer {with_startup}, with the trace alone {trace_alone}"
    );

    // A chunk tampered with in the registry: its metadata still binds, so the layer is
    // stacked; the chunk fails its digest check as it arrives, which refuses the layer: that
    // chunk is never served, the layers below answer; the trace still prefetches; right bytes.
    let data = stored_blob(&t.join("registry"), &startup);
    let good = std::fs::read(&data).expect("stored startup blob");
    let mut bad = good.clone();
    let n = bad.len();
    bad[n / 3] ^= 0x01;
    std::fs::write(&data, &bad).expect("tamper");
    let refused = "refusing the startup layer shipped in the image";
    let (d, _) = serve_until(t, &remote, "cache-c", port, refused);
    let log = d.log();
    assert!(log.contains("stacking the startup layer"), "{log}");
    assert!(log.contains("a chunk failed its digest check"), "{log}");
    assert_eq!(
        metric(
            port,
            "lsm_trace_total{trace=\"startup\",result=\"refused\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(port, "lsm_trace_total{trace=\"shipped\",result=\"used\"}"),
        1.0
    );
    assert_serves_the_image(d, &copy, &raw);
    // Its metadata tampered with (the byte before the 96-byte trailer): refused at open,
    // never stacked.
    let mut bad = good.clone();
    bad[n - 97] ^= 0x01;
    std::fs::write(&data, &bad).expect("tamper metadata");
    let (d, _) = serve_until(t, &remote, "cache-m", port, refused);
    let log = d.log();
    assert!(!log.contains("stacking the startup layer"), "{log}");
    assert!(log.contains("sha256 does not match"), "{log}");
    assert_serves_the_image(d, &copy, &raw);
    std::fs::write(&data, &good).expect("untamper");

    // Another image's startup layer (and trace): image B, other data, baked locally.
    let tb = t.join("b");
    std::fs::create_dir_all(&tb).expect("dir");
    let (_, img_b) = rootfs_image(&tb, 19);
    ok(lsmctl(["trace", "bake"])
        .arg(&img_b)
        .args(["--", SPARSE_READS]));
    let b = read_json(&img_b);
    let local = |e: &serde_json::Value| {
        let mut e = e.clone();
        let p = tb.join(e["source"]["local"].as_str().expect("local blob"));
        e["source"]["local"] = p.to_string_lossy().into_owned().into();
        e
    };
    // B's startup layer with A's trace: not the blob A's trace was baked with.
    let mut mixed = c.clone();
    mixed["startup"] = local(&b["startup"]);
    let mixed_path = t.join("mixed.json");
    write_json(&mixed_path, &mixed);
    let (d, _) = serve_until(t, &mixed_path, "cache-d", port, refused);
    assert!(
        d.log().contains("the shipped trace was baked with"),
        "{}",
        d.log()
    );
    assert_serves_the_image(d, &copy, &raw);
    // B's trace and startup layer, a pair that binds, over A's layers: another chain.
    let mut other = c.clone();
    other["trace"] = local(&b["trace"]);
    other["startup"] = local(&b["startup"]);
    let other_path = t.join("other.json");
    write_json(&other_path, &other);
    let d = Lsmd::start(
        &t.join("lsmd-other.sock"),
        &[
            OsStr::new("--config"),
            other_path.as_os_str(),
            OsStr::new("--cache-dir"),
            t.join("cache-e").as_os_str(),
        ],
    );
    wait_for_log(&d, refused);
    assert!(d.log().contains("another layer chain"), "{}", d.log());
    assert_serves_the_image(d, &copy, &raw);
}

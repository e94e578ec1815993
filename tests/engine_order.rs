//! The request engine's promise, seen by real clients: a cold read (a chunk still in a registry
//! far away) issued first does not delay a hot read (a chunk already decoded) issued after it —
//! over NBD (qemu-io's asynchronous reads on one connection) and over the FUSE file (two
//! threads reading one file). The registry sits behind a proxy that delays every request by
//! seconds, so the order observed is the engine's doing, not luck.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lsm_e2e::faultproxy::FaultProxy;
use lsm_e2e::nbd::*;
use lsm_e2e::registry::Registry;
use lsm_e2e::*;

/// Offsets of the chunk made hot before the race and of the one left in the registry.
const HOT: u64 = 0;
const COLD: u64 = 6 << 20;

/// 8 MiB of incompressible bytes in one layer, pushed to `reg`; a config reading it through
/// `proxy_url`.
fn remote_image(t: &Path, reg: &Registry, proxy_url: &str) -> PathBuf {
    let mut data = vec![0u8; 8 << 20];
    let mut x = 0x0123_4567_89ab_cdefu64;
    for b in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes());
    }
    let (img, _) = image_from_bytes(t, &data, &[]);
    let mut c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&img).expect("config")).expect("json");
    for l in c["layers"].as_array_mut().expect("layers") {
        let path = t.join(l["source"]["local"].as_str().expect("local layer"));
        reg.push_blob("lsm/order", &std::fs::read(&path).expect("blob"));
        l["source"] = serde_json::json!({ "registry": {
            "url": proxy_url, "repository": "lsm/order", "insecure": true
        }});
    }
    if let Some(o) = c.as_object_mut() {
        o.remove("upper");
    }
    let out = t.join("far.json");
    std::fs::write(&out, serde_json::to_vec_pretty(&c).expect("json")).expect("write");
    out
}

fn serve(t: &Path, config: &Path, fuse: Option<&Path>, metrics: &str) -> Lsmd {
    let cache = t.join("cache");
    let mut args = vec![
        OsStr::new("--metrics"),
        OsStr::new(metrics),
        OsStr::new("--cache-dir"),
        cache.as_os_str(),
        OsStr::new("--prefetch"),
        OsStr::new("none"),
        OsStr::new("--read-only"),
    ];
    match fuse {
        Some(dir) => Lsmd::start_fuse(&t.join("lsmd.sock"), config.as_os_str(), dir, &args),
        None => {
            args.extend([OsStr::new("--config"), config.as_os_str()]);
            Lsmd::start(&t.join("lsmd.sock"), &args)
        }
    }
}

#[test]
fn over_nbd_a_cold_read_does_not_delay_a_hot_one_issued_after_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let reg = Registry::start(&t.join("registry"), None);
    let far = FaultProxy::start(reg.url.trim_start_matches("http://"));
    let config = remote_image(t, &reg, &far.url);
    let d = serve(t, &config, None, &format!("127.0.0.1:{}", free_port()));
    // Make HOT hot: fetched and decoded by a first read.
    ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-r",
        "-c",
        &format!("read {HOT} 4k"),
        &d.uri(),
    ]));
    far.set_latency(Duration::from_secs(3));
    let out = ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-r",
        "-c",
        &format!("aio_read {COLD} 4k"),
        "-c",
        &format!("aio_read {HOT} 4k"),
        "-c",
        "aio_flush",
        &d.uri(),
    ]));
    let at = |off: u64| {
        out.find(&format!("read 4096/4096 bytes at offset {off}\n"))
            .unwrap_or_else(|| panic!("no completion of the read at {off}:\n{out}"))
    };
    assert!(
        at(HOT) < at(COLD),
        "the hot read completed after the cold one issued before it:\n{out}"
    );
}

#[test]
fn over_fuse_a_cold_read_does_not_delay_a_hot_one_issued_after_it() {
    use std::os::unix::fs::FileExt;
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let reg = Registry::start(&t.join("registry"), None);
    let far = FaultProxy::start(reg.url.trim_start_matches("http://"));
    let config = remote_image(t, &reg, &far.url);
    let files = t.join("files");
    let metrics = format!("127.0.0.1:{}", free_port());
    let d = serve(t, &config, Some(&files), &metrics);
    let file = std::fs::File::open(files.join("far")).expect("FUSE file");
    let mut b = vec![0u8; 4096];
    file.read_exact_at(&mut b, HOT).expect("warm read");
    far.set_latency(Duration::from_secs(3));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let (f, tx_cold) = (&file, tx.clone());
        s.spawn(move || {
            let mut b = vec![0u8; 4096];
            let r = f.read_exact_at(&mut b, COLD);
            let _ = tx_cold.send(("cold", r.is_ok()));
        });
        // The cold read is on the pool (its fetch waits seconds in the proxy) before the hot
        // one starts.
        while cold_reads(&metrics) == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut b = vec![0u8; 4096];
        let r = file.read_exact_at(&mut b, HOT);
        let _ = tx.send(("hot", r.is_ok()));
    });
    let order: Vec<_> = rx.try_iter().collect();
    assert_eq!(
        order,
        [("hot", true), ("cold", true)],
        "completion order; lsmd log:\n{}",
        d.log()
    );
}

/// `lsm_requests_total{frontend="fuse",path="cold"}` of the export `far`.
fn cold_reads(metrics: &str) -> u64 {
    let text = ureq::get(&format!("http://{metrics}/metrics"))
        .call()
        .expect("metrics")
        .into_string()
        .expect("text");
    let key = "lsm_requests_total{export=\"far\",frontend=\"fuse\",path=\"cold\"} ";
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in metrics:\n{text}"))
}

//! Cross-image dedup with real images: two builds of the same Debian images (debootstrap
//! minbase, and the same plus python3), made minutes apart, share no OCI layer digest. The
//! second, converted with the first as dictionary (`--dict`), stores almost nothing new; both
//! run from a real registry on one node through a shared, content-keyed host cache that holds
//! hardly more than one image; both verify end to end; and a dictionary blob missing from the
//! registry fails with an error naming it.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use lsm_e2e::nbd::*;
use lsm_e2e::registry::Registry;
use lsm_e2e::tree::*;
use lsm_e2e::*;
use serde_json::Value;

fn json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).expect("read json")).expect("parse json")
}

/// The manifest of the image tagged `tag` in an OCI layout.
fn manifest(layout: &Path, tag: Option<&str>) -> Value {
    let index = json(&layout.join("index.json"));
    let m = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .find(|m| tag.is_none_or(|t| m["annotations"]["org.opencontainers.image.ref.name"] == t))
        .expect("image")
        .clone();
    let d = m["digest"].as_str().expect("digest");
    json(&layout.join("blobs/sha256").join(&d[7..]))
}

fn layer_digests(m: &Value) -> Vec<String> {
    m["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["digest"].as_str().expect("digest").to_string())
        .collect()
}

/// Bytes of the host cache's entry files.
fn du(dir: &Path) -> u64 {
    ok(Command::new("du").args(["-sb"]).arg(dir))
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("du")
}

/// Reads every byte of every file under `root`.
fn read_every_file(root: &Path) {
    ok(Command::new("sh")
        .arg("-c")
        .arg("find . -xdev -type f -print0 | xargs -0 cat > /dev/null")
        .current_dir(root));
}

#[test]
fn rebuilt_debian_images_share_blocks_through_a_dictionary() {
    let first = debian_images("debian-v1");
    let second = debian_images("debian-v1-b");
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();

    // The OCI forms share nothing.
    for tag in ["base", "py"] {
        let (m1, m2) = (manifest(&first, Some(tag)), manifest(&second, Some(tag)));
        let (d1, d2) = (layer_digests(&m1), layer_digests(&m2));
        assert!(d1.iter().all(|d| !d2.contains(d)), "{d1:?} {d2:?}");
    }

    let reg = Registry::start(&t.join("registry"), None);
    let host = reg.url.trim_start_matches("http://").to_string();
    for tag in ["base", "py"] {
        for (oci, n) in [(&first, 1), (&second, 2)] {
            ok(Command::new("skopeo")
                .args(["copy", "-q", "--insecure-policy", "--dest-tls-verify=false"])
                .arg(format!("oci:{}:{tag}", oci.display()))
                .arg(format!("docker://{host}/debian/{tag}:{n}")));
        }
    }
    let src = |n: u32| format!("{}/debian/py:{n}", reg.url);

    // The base image alone: the rebuild, with the first build as dictionary, stores ≤ 2 %.
    for (n, extra) in [(1, None), (2, Some(format!("{}/lsm/base:1", reg.url)))] {
        let mut c = lsmctl(["convert", "--insecure", "--no-reuse", "-q"]);
        c.arg(format!("{}/debian/base:{n}", reg.url))
            .arg(t.join(format!("base{n}")))
            .args(["--push", &format!("{}/lsm/base:{n}", reg.url)]);
        if let Some(d) = extra {
            c.args(["--dict", &d]);
        }
        let o = run(&mut c);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let own_bytes = |m: &Value| -> u64 {
        m["layers"]
            .as_array()
            .expect("layers")
            .iter()
            .filter(|l| l["annotations"]["io.lsm.layer.role"] == "layer")
            .map(|l| l["size"].as_u64().expect("size"))
            .sum()
    };
    let (b1, b2) = (
        own_bytes(&manifest(&t.join("base1"), None)),
        own_bytes(&manifest(&t.join("base2"), None)),
    );
    eprintln!("base: first {b1} blob bytes, rebuild {b2} new blob bytes");
    assert!(b2 * 50 <= b1, "{b2} vs {b1}");

    // The first build, converted and pushed as usual.
    let a = t.join("a");
    let o = run(lsmctl(["convert", "--insecure", "--no-reuse", "-q"])
        .arg(src(1))
        .arg(&a)
        .args(["--push", &format!("{}/lsm/py:1", reg.url)]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a_bytes: u64 = manifest(&a, None)["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["size"].as_u64().expect("size"))
        .sum();

    // What the rebuild would share, before converting it.
    let report = ok(lsmctl(["dedup-report", "--insecure", "--json"])
        .arg(format!("{}/lsm/py:1", reg.url))
        .arg(src(2)));
    let r: Value = serde_json::from_str(&report).expect("report json");
    let (shared, blocks) = (
        r["shared_blocks"].as_u64().expect("shared"),
        r["blocks"].as_u64().expect("blocks"),
    );
    eprintln!("dedup-report: {shared} of {blocks} blocks shared; {r}");
    assert!(shared * 100 >= blocks * 95, "{r}");

    // The rebuild, converted with the first as dictionary, pushed to another repository: the
    // dictionary blobs are mounted there, not uploaded.
    let b = t.join("b");
    let o = run(lsmctl(["convert", "--insecure", "--no-reuse"])
        .arg(src(2))
        .arg(&b)
        .args(["--dict", &format!("{}/lsm/py:1", reg.url)])
        .args(["--push", &format!("{}/rebuilt/py:1", reg.url)]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("2 mounted from another repository"), "{err}");
    let mb = manifest(&b, None);
    let (mut new_bytes, mut dict_blobs) = (0, Vec::new());
    for l in mb["layers"].as_array().expect("layers") {
        if l["annotations"]["io.lsm.layer.role"] == "dictionary" {
            dict_blobs.push(l["digest"].as_str().expect("digest").to_string());
        } else if l["annotations"]["io.lsm.layer.role"] == "layer" {
            new_bytes += l["size"].as_u64().expect("size");
        }
    }
    eprintln!(
        "first image {a_bytes} blob bytes; rebuild {new_bytes} new blob bytes ({:.2} %)",
        100.0 * new_bytes as f64 / a_bytes as f64
    );
    assert!(new_bytes * 50 <= a_bytes, "{new_bytes} vs {a_bytes}");
    assert_eq!(dict_blobs.len(), 2, "{mb}");
    assert!(dict_blobs
        .iter()
        .all(|d| layer_digests(&manifest(&a, None)).contains(d)));

    // Both verify end to end from the registry (the rebuild's borrowed chunks included).
    let v = ok(lsmctl(["verify"])
        .arg(a.join("lsm-remote.json"))
        .arg(b.join("lsm-remote.json")));
    assert_eq!(v.lines().filter(|l| l.starts_with("ok")).count(), 6, "{v}");

    // Both served from the registry on one node, empty cache: read every file of the first,
    // then of the second; the rebuild must equal umoci's unpack of it.
    let cache = t.join("cache");
    let metrics = format!("127.0.0.1:{}", free_port());
    let files = t.join("files");
    std::fs::create_dir_all(&files).expect("files");
    let ca = format!("a={}", a.join("lsm-remote.json").display());
    let cb = format!("b={}", b.join("lsm-remote.json").display());
    let d = Lsmd::start(
        &t.join("lsmd.sock"),
        &[
            OsStr::new("--config"),
            OsStr::new(&ca),
            OsStr::new("--config"),
            OsStr::new(&cb),
            OsStr::new("--fuse"),
            files.as_os_str(),
            OsStr::new("--cache-dir"),
            cache.as_os_str(),
            OsStr::new("--metrics"),
            OsStr::new(&metrics),
        ],
    );
    {
        let m = Mounted::with(&files.join("a"), &t.join("mnt-a"), true);
        read_every_file(&m.dir);
    }
    let one = du(&cache);
    let bundle = t.join("bundle");
    ok(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:py", second.display()))
        .arg(&bundle));
    {
        let m = Mounted::with(&files.join("b"), &t.join("mnt-b"), true);
        assert_same_tree(&bundle.join("rootfs"), &m.dir, None);
        read_every_file(&m.dir);
    }
    let both = du(&cache);
    let status: Value = serde_json::from_str(&ok(&mut lsmctl([
        "status",
        "--json",
        "--metrics",
        &metrics,
    ])))
    .expect("status");
    eprintln!("cache after the first image {one} bytes, after both {both}; status {status}");
    assert!(both * 100 <= one * 102, "{both} vs {one}");
    let logical = status["cache"]["logical_bytes"].as_u64().expect("logical");
    let physical = status["cache"]["bytes"].as_u64().expect("physical");
    assert!(logical > physical * 18 / 10, "{status}");
    d.terminate();

    // A dictionary blob missing from the registry: attaching fails, naming it.
    std::fs::remove_dir_all(reg.repo_link("rebuilt/py", &dict_blobs[0])).expect("unlink blob");
    let o = run(Command::new(bin("lsmd"))
        .args(["serve", "--config"])
        .arg(b.join("lsm-remote.json"))
        .arg("--socket")
        .arg(t.join("gone.sock")));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains(&dict_blobs[0]), "{err}");
    let o = run(lsmctl(["verify"]).arg(b.join("lsm-remote.json")));
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && out.contains(&dict_blobs[0]), "{out}");
}

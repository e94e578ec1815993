//! `lsmctl convert --dict` against a registry image reads the image's `hash-index` blob and each
//! lsm blob's metadata (ranged GETs), never a whole blob (FORMAT.md §8), and converts to the
//! same bytes as `--dict` over the blobs downloaded whole. A real docker-registry serves the
//! dictionary image; its access log counts the bytes each GET returned. A hash-index blob that
//! does not match its digest is refused; an image without one is read whole, saying so.

use std::path::Path;

use lsm_e2e::registry::Registry;
use lsm_e2e::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// Deterministic incompressible bytes.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A file of a generated layer: path, content seed, length.
type FileSpec = (String, u64, usize);

/// A tar of files `(path, seed, len)`.
fn tar_of(files: &[FileSpec]) -> Vec<u8> {
    let mut t = tar::Builder::new(Vec::new());
    for (path, seed, len) in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(*len as u64);
        h.set_mtime(1_700_000_000);
        t.append_data(&mut h, path, &noise(*seed, *len)[..])
            .expect("tar");
    }
    t.into_inner().expect("tar")
}

/// An OCI layout at `dir` tagged `t` with these uncompressed layers.
fn oci_layout(dir: &Path, layers: &[Vec<u8>]) {
    let put = |b: &[u8]| put_oci_blob(dir, b);
    let descs: Vec<Value> = layers
        .iter()
        .map(|l| serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": put(l), "size": l.len()}))
        .collect();
    let diff_ids: Vec<String> = layers.iter().map(|l| sha(l)).collect();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    finish_oci_layout(dir, &config, descs, "t");
}

/// Two builds of one two-layer image: the second changes one file, adds one early in the
/// first layer (moving the files after it on disk) and drops one. Third: the second's first
/// layer under another top layer.
fn images(t: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let files = |rebuild: bool| -> (Vec<FileSpec>, Vec<FileSpec>) {
        let mut low: Vec<FileSpec> = (0..40u64)
            .map(|i| {
                (
                    format!("usr/lib/f{i:02}"),
                    i,
                    4096 * (1 + (i as usize * 7) % 24),
                )
            })
            .collect();
        let mut high: Vec<FileSpec> = (40..56u64)
            .map(|i| {
                (
                    format!("opt/app/g{i:02}"),
                    i,
                    4096 * (2 + (i as usize * 5) % 40),
                )
            })
            .collect();
        if rebuild {
            low.insert(0, ("usr/lib/a-new".into(), 1000, 300_000));
            low[10].1 += 500; // f09 changed
            high.remove(3);
        }
        (low, high)
    };
    let mut out = Vec::new();
    for (name, rebuild) in [("a-src", false), ("b-src", true)] {
        let (low, high) = files(rebuild);
        let dir = t.join(name);
        oci_layout(&dir, &[tar_of(&low), tar_of(&high)]);
        out.push(dir);
    }
    let (low, _) = files(true);
    let c = t.join("c-src");
    oci_layout(
        &c,
        &[tar_of(&low), tar_of(&[("srv/other".into(), 77, 65536)])],
    );
    (out.remove(0), out.remove(0), c)
}

fn manifest(layout: &Path) -> (Value, Vec<u8>) {
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index"))
            .expect("json");
    let d = index["manifests"][0]["digest"].as_str().expect("digest");
    let bytes = std::fs::read(layout.join("blobs/sha256").join(&d[7..])).expect("manifest");
    (serde_json::from_slice(&bytes).expect("json"), bytes)
}

fn role(l: &Value) -> &str {
    l["annotations"]["io.lsm.layer.role"].as_str().unwrap_or("")
}

fn convert_b(src: &Path, dst: &Path, dict: &str) -> std::process::Output {
    run(
        lsmctl(["convert", "--insecure", "--no-reuse", "--tag", "t"])
            .arg(src)
            .arg(dst)
            .args(["--dict", dict]),
    )
}

#[test]
fn dict_from_a_registry_reads_the_hash_index_not_the_blobs() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let (a_src, b_src, c_src) = images(t);
    let reg = Registry::start(&t.join("registry"), None);

    // The first build, converted and pushed: its manifest lists a hash-index blob, last.
    let a = t.join("a");
    ok(
        lsmctl(["convert", "--insecure", "--no-reuse", "-q", "--tag", "t"])
            .arg(&a_src)
            .arg(&a)
            .args(["--push", &format!("{}/lsm/a:1", reg.url)]),
    );
    let (ma, _) = manifest(&a);
    let a_layers = ma["layers"].as_array().expect("layers").clone();
    assert_eq!(
        a_layers.iter().map(role).collect::<Vec<_>>(),
        ["layer", "layer", "hash-index"],
        "{ma}"
    );
    let index_digest = a_layers[2]["digest"].as_str().expect("digest").to_string();

    // The rebuild with the registry image as dictionary: through the index.
    let b_remote = t.join("b-remote");
    let o = convert_b(&b_src, &b_remote, &format!("{}/lsm/a:1", reg.url));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("read through its hash index"), "{err}");

    // No lsm blob of the dictionary was fetched whole: each GET of one returned less than
    // the metadata and trailer (one ranged read per blob, sized by io.lsm.layer.meta-len).
    for l in a_layers.iter().filter(|l| role(l) == "layer") {
        let d = l["digest"].as_str().expect("digest");
        let size = l["size"].as_u64().expect("size");
        let meta_len: u64 = l["annotations"]["io.lsm.layer.meta-len"]
            .as_str()
            .expect("meta-len")
            .parse()
            .expect("number");
        let gets: Vec<u64> = reg
            .served()
            .into_iter()
            .filter(|(uri, _)| uri.ends_with(&format!("/blobs/{d}")))
            .map(|(_, n)| n)
            .collect();
        eprintln!("blob {d}: {size} bytes, GETs {gets:?}");
        assert!(!gets.is_empty(), "{d} was not read at all");
        assert!(
            gets.iter().all(|&n| n <= meta_len + 96 && n < size),
            "{d} ({size} bytes, metadata {meta_len}): GETs {gets:?}"
        );
    }
    let index_gets = reg.served_of_blob(&index_digest);
    assert!(index_gets > 0, "the hash index was not read");

    // The same rebuild with the dictionary downloaded whole (a local layout): the same bytes.
    let b_whole = t.join("b-whole");
    let o = convert_b(&b_src, &b_whole, a.to_str().expect("utf-8"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (mb, mb_bytes) = manifest(&b_whole);
    let (_, mr_bytes) = manifest(&b_remote);
    assert_eq!(mb_bytes, mr_bytes, "manifests differ");
    let roles: Vec<&str> = mb["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(role)
        .collect();
    assert!(roles.contains(&"dictionary"), "nothing borrowed: {mb}");
    for l in mb["layers"].as_array().expect("layers") {
        let d = &l["digest"].as_str().expect("digest")[7..];
        let whole = std::fs::read(b_whole.join("blobs/sha256").join(d)).expect("blob");
        match std::fs::read(b_remote.join("blobs/sha256").join(d)) {
            Ok(remote) => assert!(remote == whole, "blob {d} differs"),
            // A dictionary blob read through the index is not in the layout.
            Err(_) => assert_eq!(
                role(l),
                "dictionary",
                "{d} missing from {}",
                b_remote.display()
            ),
        }
    }
    let new_bytes: u64 = mb["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .filter(|l| role(l) == "layer")
        .map(|l| l["size"].as_u64().expect("size"))
        .sum();
    let a_bytes: u64 = a_layers
        .iter()
        .filter(|l| role(l) == "layer")
        .map(|l| l["size"].as_u64().expect("size"))
        .sum();
    eprintln!("first build {a_bytes} layer bytes, rebuild {new_bytes} new layer bytes");
    assert!(new_bytes * 2 < a_bytes, "{new_bytes} vs {a_bytes}");

    // The rebuild read through the index verifies end to end, borrowed chunks fetched from
    // the dictionary's registry (its image config names it for the blobs it does not hold).
    let v = ok(lsmctl(["verify"]).arg(b_remote.join("lsm-image.json")));
    assert!(v.lines().all(|l| l.starts_with("ok")), "{v}");

    // A layer reused from the database under a new one: the layers below are exported back to
    // a raw filesystem, reading the chunks they borrow from the dictionary by ranged GETs —
    // still no whole blob — and the result verifies.
    let db = t.join("db");
    for (src, dst) in [(&b_src, t.join("b-db")), (&c_src, t.join("c-db"))] {
        let o = run(lsmctl(["convert", "--insecure", "--tag", "t", "--db"])
            .arg(&db)
            .arg(src)
            .arg(&dst)
            .args(["--dict", &format!("{}/lsm/a:1", reg.url)]));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        if dst.ends_with("c-db") {
            assert!(err.contains("(reused)"), "{err}");
        }
    }
    let v = ok(lsmctl(["verify"]).arg(t.join("c-db/lsm-image.json")));
    assert!(v.lines().all(|l| l.starts_with("ok")), "{v}");
    for l in a_layers.iter().filter(|l| role(l) == "layer") {
        let d = l["digest"].as_str().expect("digest");
        let size = l["size"].as_u64().expect("size");
        assert!(
            reg.served()
                .iter()
                .filter(|(uri, _)| uri.ends_with(&format!("/blobs/{d}")))
                .all(|&(_, n)| n < size),
            "a whole GET of {d}"
        );
    }

    // An image without a hash index (converted before it existed: here, the same manifest
    // without that entry) is read whole, saying so, to the same result.
    let mut old = ma.clone();
    old["layers"].as_array_mut().expect("layers").pop();
    let old_bytes = serde_json::to_vec(&old).expect("json");
    let resp = reg
        .agent()
        .put(&format!("{}/v2/lsm/a/manifests/old", reg.url))
        .set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        .send_bytes(&old_bytes);
    assert!(resp.is_ok(), "{resp:?}");
    let b_old = t.join("b-old");
    let o = convert_b(&b_src, &b_old, &format!("{}/lsm/a:old", reg.url));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("no hash-index blob"), "{err}");
    assert_eq!(manifest(&b_old).1, mb_bytes, "manifests differ");

    // A hash-index blob whose bytes do not match its digest is refused; nothing is written.
    let stored = reg.blob_file(&index_digest);
    let mut bytes = std::fs::read(&stored).expect("index blob");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(&stored, &bytes).expect("tamper");
    let b_bad = t.join("b-bad");
    let o = convert_b(&b_src, &b_bad, &format!("{}/lsm/a:1", reg.url));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains(&index_digest) && err.contains("does not match its digest"),
        "{err}"
    );
    assert!(!b_bad.join("index.json").exists());
}

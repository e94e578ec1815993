//! Helpers shared by the end-to-end tests: locating the built binaries, running them, and
//! building real ext4 images with the system's own `mkfs.ext4` and `debugfs`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

/// The directory cargo put this test's binaries in (`target/<profile>`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// Path of a workspace binary; `tests/run` builds them before the tests run.
pub fn bin(name: &str) -> PathBuf {
    let p = target_dir().join(name);
    assert!(
        p.exists(),
        "{} is not built: run `bash tests/run` (or `cargo build --workspace --bins` with the same profile first)",
        p.display()
    );
    p
}

/// Runs a command, returning its output; panics with stderr if it could not start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command that must succeed; returns stdout.
pub fn ok(cmd: &mut Command) -> String {
    let o = run(cmd);
    assert!(
        o.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `lsmctl` with arguments.
pub fn lsmctl<I: IntoIterator<Item = S>, S: AsRef<std::ffi::OsStr>>(args: I) -> Command {
    let mut c = Command::new(bin("lsmctl"));
    c.args(args);
    c
}

/// Writes `data` as `dir/ref.raw`, imports it (with extra `import_args`) as `dir/base.blob`,
/// and creates `dir/img.json` over it with an upper layer. Returns (config, raw reference).
pub fn image_from_bytes(dir: &Path, data: &[u8], import_args: &[&str]) -> (PathBuf, PathBuf) {
    let raw = dir.join("ref.raw");
    std::fs::write(&raw, data).expect("write raw");
    let blob = dir.join("base.blob");
    ok(lsmctl(["import", "-q"])
        .args(import_args)
        .arg(&raw)
        .arg("-o")
        .arg(&blob));
    let img = dir.join("img.json");
    ok(lsmctl(["create"]).arg(&img).arg("--layer").arg(&blob));
    (img, raw)
}

/// sha256 of a file, hex.
pub fn sha256_file(p: &Path) -> String {
    let mut f = std::fs::File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).expect("read");
    hex::encode(h.finalize())
}

/// Copies whole entries of `/usr/share`, in name order, into `dst` while they fit in
/// `budget_mib`: real files of every kind (text, compressed docs, images, locales).
pub fn stage_usr_share(dst: &Path, budget_mib: u64) -> u64 {
    std::fs::create_dir_all(dst).expect("mkdir");
    let mut names: Vec<PathBuf> = std::fs::read_dir("/usr/share")
        .expect("/usr/share")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    names.sort();
    let mut used = 0u64;
    for p in names {
        let du = ok(Command::new("du").args(["-sk", "--apparent-size"]).arg(&p));
        let kib: u64 = du
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(u64::MAX);
        if used + kib / 1024 + 1 > budget_mib {
            continue;
        }
        ok(Command::new("cp").arg("-a").arg(&p).arg(dst));
        used += kib / 1024 + 1;
    }
    used
}

/// Makes a `size_mib` ext4 image at `img` populated from `dir` (no mount needed).
pub fn mkfs_ext4(img: &Path, size_mib: u64, dir: &Path) {
    let _ = std::fs::remove_file(img);
    ok(Command::new("truncate")
        .arg("-s")
        .arg(format!("{size_mib}M"))
        .arg(img));
    ok(Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-E",
            "root_owner=0:0",
            "-U",
            "2b1f6e0e-5b2c-4c3a-9d0e-0123456789ab",
            "-d",
        ])
        .arg(dir)
        .arg(img));
}

/// Applies `debugfs -w` commands to an ext4 image (write, rm, mkdir, …) and checks fsck.
pub fn debugfs(img: &Path, cmds: &str) {
    let f = img.with_extension("debugfs-cmds");
    std::fs::write(&f, cmds).expect("write cmds");
    ok(Command::new("debugfs").arg("-w").arg("-f").arg(&f).arg(img));
    ok(Command::new("e2fsck").args(["-f", "-n"]).arg(img));
}

/// Bytes of `zstd -3` over the non-zero 4 KiB blocks of a raw image: the yardstick for the
/// imported size.
pub fn zstd3_of_nonzero_blocks(img: &Path) -> u64 {
    let data = std::fs::read(img).expect("read image");
    let mut nz = Vec::with_capacity(data.len());
    for b in data.chunks(4096) {
        if b.iter().any(|&x| x != 0) {
            nz.extend_from_slice(b);
        }
    }
    let tmp = img.with_extension("nonzero");
    std::fs::write(&tmp, &nz).expect("write");
    let out = run(Command::new("zstd")
        .args(["-3", "-q", "-c", "--single-thread"])
        .arg(&tmp));
    assert!(out.status.success(), "zstd failed");
    let _ = std::fs::remove_file(&tmp);
    out.stdout.len() as u64
}

/// Writes `bytes` as a blob of the OCI image layout at `dir`; returns its digest.
pub fn put_oci_blob(dir: &Path, bytes: &[u8]) -> String {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("mkdir");
    let hex = hex::encode(sha2::Sha256::digest(bytes));
    std::fs::write(blobs.join(&hex), bytes).expect("blob");
    format!("sha256:{hex}")
}

/// Completes the OCI image layout at `dir` (whose layer blobs [`put_oci_blob`] wrote): image
/// config `config`, a manifest over the layer descriptors `layers`, and an index naming it
/// `tag`.
pub fn finish_oci_layout(
    dir: &Path,
    config: &serde_json::Value,
    layers: Vec<serde_json::Value>,
    tag: &str,
) {
    let config = serde_json::to_vec(config).expect("json");
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": put_oci_blob(dir, &config), "size": config.len() },
        "layers": layers,
    }))
    .expect("json");
    let index = serde_json::json!({ "schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": put_oci_blob(dir, &manifest), "size": manifest.len(),
        "annotations": { "org.opencontainers.image.ref.name": tag },
    }] });
    std::fs::write(dir.join("index.json"), index.to_string()).expect("index");
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("layout");
}

/// A one-layer OCI image layout (an uncompressed tar with a few files) tagged `t`.
pub fn tiny_oci_layout(dir: &Path) {
    let mut tar = tar::Builder::new(Vec::new());
    for (name, body) in [("etc/hostname", "lsm\n"), ("srv/data", "tls test data\n")] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mode(0o644);
        h.set_size(body.len() as u64);
        h.set_mtime(1_700_000_000);
        tar.append_data(&mut h, name, body.as_bytes()).expect("tar");
    }
    let layer = tar.into_inner().expect("tar");
    let diff = put_oci_blob(dir, &layer);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": [diff] },
    });
    let layers = vec![
        serde_json::json!({ "mediaType": "application/vnd.oci.image.layer.v1.tar",
                                          "digest": diff, "size": layer.len() }),
    ];
    finish_oci_layout(dir, &config, layers, "t");
}

#[path = "support/nbd.rs"]
pub mod nbd;

#[path = "support/registry.rs"]
pub mod registry;

#[path = "support/faultproxy.rs"]
pub mod faultproxy;

#[path = "support/hostile.rs"]
pub mod hostile;

#[path = "support/squid.rs"]
pub mod squid;

#[path = "support/tree.rs"]
pub mod tree;

/// An OCI layout of real Debian images (tags `base` and `py`), built once by
/// `support/debian-images.sh` and cached outside the clone (`$LSM_IMAGE_CACHE`, default
/// `/var/cache/lsm-images`). Each `generation` is a separate build: two generations hold the
/// same packages but, built at different times, share no layer digest.
pub fn debian_images(generation: &str) -> PathBuf {
    let root = std::env::var_os("LSM_IMAGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/lsm-images"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("support/debian-images.sh");
    PathBuf::from(ok(Command::new("bash").arg(script).arg(root.join(generation))).trim())
}

#[path = "support/containerd.rs"]
pub mod containerd;

#[path = "support/cri.rs"]
pub mod cri;

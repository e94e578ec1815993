//! `lsmctl convert` against umoci, the reference OCI unpacker: a synthetic image exercising every
//! whiteout case (file deleted, directory replaced by a file, opaque directory, file re-created
//! after deletion) plus owners, modes, xattrs, symlinks (one absolute), hard links, a device and
//! a fifo is converted; lsmd serves the result through the FUSE file, the kernel mounts it, and
//! the tree equals `umoci unpack` of the source. Converting twice gives the same digest; bad
//! layers are refused with no image written.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use lsm_e2e::nbd::*;
use lsm_e2e::tree::*;
use lsm_e2e::*;
use sha2::{Digest, Sha256};

/// Builds tar layers entry by entry.
struct TarLayer(tar::Builder<Vec<u8>>);

impl TarLayer {
    fn new() -> TarLayer {
        TarLayer(tar::Builder::new(Vec::new()))
    }

    fn header(kind: tar::EntryType, mode: u32, uid: u64, gid: u64, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_size(size);
        h.set_mtime(1_700_000_000);
        h
    }

    fn dir(mut self, path: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, 0o755, 0, 0, 0);
        self.0.append_data(&mut h, path, &[][..]).expect("dir");
        self
    }

    fn file(self, path: &str, body: &str) -> Self {
        self.file_as(path, body, 0o644, 0, 0)
    }

    fn file_as(mut self, path: &str, body: &str, mode: u32, uid: u64, gid: u64) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, uid, gid, body.len() as u64);
        self.0
            .append_data(&mut h, path, body.as_bytes())
            .expect("file");
        self
    }

    fn link(mut self, kind: tar::EntryType, path: &str, target: &str) -> Self {
        let mut h = Self::header(kind, 0o777, 0, 0, 0);
        self.0.append_link(&mut h, path, target).expect("link");
        self
    }

    fn node(mut self, kind: tar::EntryType, path: &str, major: u32, minor: u32) -> Self {
        let mut h = Self::header(kind, 0o666, 0, 0, 0);
        h.set_device_major(major).expect("major");
        h.set_device_minor(minor).expect("minor");
        self.0.append_data(&mut h, path, &[][..]).expect("node");
        self
    }

    fn xattr(mut self, key: &str, value: &str) -> Self {
        let k = format!("SCHILY.xattr.{key}");
        self.0
            .append_pax_extensions([(k.as_str(), value.as_bytes())])
            .expect("pax");
        self
    }

    fn finish(self) -> Vec<u8> {
        self.0.into_inner().expect("tar")
    }
}

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn gzip(b: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(b).expect("gzip");
    e.finish().expect("gzip")
}

/// Writes an OCI image layout at `dir` tagged `t` with these (tar, compressed?) layers.
fn oci_layout(dir: &Path, layers: &[(Vec<u8>, bool)]) {
    let put = |b: &[u8]| put_oci_blob(dir, b);
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (tar, gz) in layers {
        diff_ids.push(sha(tar));
        let (bytes, media) = if *gz {
            (gzip(tar), "application/vnd.oci.image.layer.v1.tar+gzip")
        } else {
            (tar.clone(), "application/vnd.oci.image.layer.v1.tar")
        };
        descs.push(
            serde_json::json!({"mediaType": media, "digest": put(&bytes), "size": bytes.len()}),
        );
    }
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    finish_oci_layout(dir, &config, descs, "t");
}

fn whiteout_image(dir: &Path) {
    use tar::EntryType::*;
    let l1 = TarLayer::new()
        .dir("etc")
        .file("etc/hostname", "one\n")
        .dir("d")
        .file("d/x", "x")
        .file("d/y", "y")
        .dir("o")
        .file("o/p", "p")
        .file("o/q", "q")
        .file("gone.txt", "bye")
        .file("back.txt", "first")
        .xattr("user.lsm", "layer1")
        .file_as("owned.txt", "owned", 0o4750, 1234, 5678)
        .link(Symlink, "link", "etc/hostname")
        .link(Symlink, "abs", "/etc")
        .link(Link, "hard", "etc/hostname")
        .node(Char, "null", 1, 3)
        .node(Fifo, "fifo", 0, 0)
        .finish();
    let l2 = TarLayer::new()
        .file(".wh.gone.txt", "")
        .file(".wh.d", "")
        .file("d", "now a file")
        .dir("o")
        .file("o/.wh..wh..opq", "")
        .file("o/new", "new")
        .file(".wh.back.txt", "")
        .file("abs/written", "through an absolute symlink")
        .finish();
    let l3 = TarLayer::new().file("back.txt", "second").finish();
    oci_layout(dir, &[(l1, true), (l2, false), (l3, true)]);
}

/// The synthetic image at `dir/src`, and umoci's own unpack of it (the reference tree).
fn source_and_reference(t: &Path) -> (PathBuf, PathBuf) {
    let src = t.join("src");
    whiteout_image(&src);
    let bundle = t.join("bundle");
    ok(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:t", src.display()))
        .arg(&bundle));
    (src, bundle.join("rootfs"))
}

fn convert(src: &Path, dst: &Path) -> std::process::Output {
    run(lsmctl(["convert", "-q", "--no-reuse", "--tag", "t"])
        .arg(src)
        .arg(dst))
}

#[test]
fn whiteouts_and_metadata_match_umoci_and_conversion_is_reproducible() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let (src, reference) = source_and_reference(t);

    let dst = t.join("dst");
    let o = convert(&src, &dst);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let digest = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(digest.starts_with("sha256:"), "{digest}");
    // Determinism: a second conversion gives the same manifest digest.
    std::thread::sleep(std::time::Duration::from_millis(1100)); // another unpack time
    let o2 = convert(&src, &t.join("dst2"));
    let again = String::from_utf8_lossy(&o2.stdout).trim().to_string();
    assert_eq!(again, digest, "conversion is not deterministic");
    // Contained: the absolute symlink was followed inside the image only.
    assert!(!Path::new("/etc/written").exists());

    let files = t.join("files");
    let name = format!("img={}", dst.join("lsm-image.json").display());
    let d = Lsmd::start_fuse(&t.join("lsmd.sock"), OsStr::new(&name), &files, &[]);
    {
        let m = Mounted::with(&files.join("img"), &t.join("mnt"), true);
        assert_same_tree(&reference, &m.dir, Some("user.lsm"));
        // The whiteout cases, spelled out.
        assert!(!m.dir.join("gone.txt").exists());
        assert_eq!(
            std::fs::read_to_string(m.dir.join("d")).expect("d"),
            "now a file"
        );
        let mut o: Vec<String> = std::fs::read_dir(m.dir.join("o"))
            .expect("o")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        o.sort();
        assert_eq!(o, ["new"]);
        assert_eq!(
            std::fs::read_to_string(m.dir.join("back.txt")).expect("back"),
            "second"
        );
        assert_eq!(
            std::fs::read_to_string(m.dir.join("etc/written")).expect("written"),
            "through an absolute symlink"
        );
    }
    d.terminate();
}

/// `--fs erofs`: the same image flattened into one read-only erofs layer gives the tree umoci
/// unpacks (every whiteout case, owners, modes, set-id bits, xattrs, hard links, devices),
/// mounted with the kernel's erofs on the FUSE file, and converts reproducibly.
#[test]
fn erofs_conversion_matches_umoci_and_is_reproducible() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let (src, reference) = source_and_reference(t);
    let erofs = |dst: &Path| {
        run(
            lsmctl(["convert", "-q", "--no-reuse", "--fs", "erofs", "--tag", "t"])
                .arg(&src)
                .arg(dst),
        )
    };
    let dst = t.join("dst");
    let o = erofs(&dst);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let digest = String::from_utf8_lossy(&o.stdout).trim().to_string();
    std::thread::sleep(std::time::Duration::from_millis(1100)); // another build time
    let o2 = erofs(&t.join("dst2"));
    assert_eq!(
        String::from_utf8_lossy(&o2.stdout).trim(),
        digest,
        "erofs conversion is not deterministic"
    );
    let image: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dst.join("lsm-image.json")).expect("image"))
            .expect("json");
    assert_eq!(
        image["layers"].as_array().map(|l| l.len()),
        Some(1),
        "flattened"
    );

    let files = t.join("files");
    let name = format!("img={}", dst.join("lsm-image.json").display());
    let d = Lsmd::start_fuse(&t.join("lsmd.sock"), OsStr::new(&name), &files, &[]);
    {
        let m = Mounted::with(&files.join("img"), &t.join("mnt"), true);
        let fstype = ok(Command::new("findmnt")
            .args(["-n", "-o", "FSTYPE"])
            .arg(&m.dir));
        assert_eq!(fstype.trim(), "erofs");
        assert_same_tree(&reference, &m.dir, Some("user.lsm"));
        assert!(!m.dir.join("gone.txt").exists());
        assert_eq!(
            std::fs::read_to_string(m.dir.join("back.txt")).expect("back"),
            "second"
        );
    }
    d.terminate();
}

/// A layer debugfs cannot replay in place — one path named twice in its tar — has its
/// filesystem made whole instead; parent directories a tar does not name get a fixed time (the conversion says so), and the layers above
/// it are applied in place again: the tree still equals umoci's and the conversion stays
/// reproducible.
#[test]
fn layers_debugfs_cannot_replay_are_made_whole() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let l1 = TarLayer::new()
        .dir("d")
        .file("d/keep", "kept")
        .file("d/old", "old")
        .finish();
    let l2 = TarLayer::new()
        .file("d/twice", "first")
        .file("d/twice", "second")
        .finish();
    let l3 = TarLayer::new()
        .file("d/.wh.old", "")
        .file("d/new", "in place")
        .link(tar::EntryType::Link, "d/again", "d/twice")
        .file("implicit/parents/f", "parents the tar does not name")
        .finish();
    let src = t.join("src");
    oci_layout(&src, &[(l1, true), (l2, true), (l3, false)]);
    let bundle = t.join("bundle");
    ok(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:t", src.display()))
        .arg(&bundle));
    let conv = |dst: &Path| {
        run(lsmctl(["convert", "--no-reuse", "--tag", "t"])
            .arg(&src)
            .arg(dst))
    };
    let dst = t.join("dst");
    let o = conv(&dst);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(
        err.matches("making its filesystem whole").count(),
        1,
        "only layer 2 is made whole: {err}"
    );
    std::thread::sleep(std::time::Duration::from_millis(1100)); // another unpack time
    let o2 = conv(&t.join("dst2"));
    assert_eq!(o2.stdout, o.stdout, "not reproducible");

    let files = t.join("files");
    let name = format!("img={}", dst.join("lsm-image.json").display());
    let d = Lsmd::start_fuse(&t.join("lsmd.sock"), OsStr::new(&name), &files, &[]);
    {
        let m = Mounted::with(&files.join("img"), &t.join("mnt"), true);
        assert_same_tree(&bundle.join("rootfs"), &m.dir, None);
        assert_eq!(
            std::fs::read_to_string(m.dir.join("d/again")).expect("again"),
            "second"
        );
    }
    d.terminate();
}

#[test]
fn bad_layers_are_refused_and_leave_no_image() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    whiteout_image(&t.join("srcS"));

    // A path climbing out of the root.
    let evil = t.join("evil");
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(4);
    h.set_mode(0o644);
    // Set the raw name: the builder refuses `..` itself.
    h.as_old_mut().name[..12].copy_from_slice(b"../escape.tx");
    h.set_cksum();
    b.append(&h, &b"evil"[..]).expect("append");
    oci_layout(&evil, &[(b.into_inner().expect("tar"), false)]);
    let out = t.join("out-evil");
    let o = convert(&evil, &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("climbs out"), "{err}");
    assert!(!out.join("index.json").exists() && !t.join("escape.tx").exists());

    // An image larger than the filesystem asked for.
    let small = t.join("out-small");
    let o = run(
        lsmctl(["convert", "-q", "--no-reuse", "--tag", "t", "--size", "64K"])
            .arg(t.join("srcS"))
            .arg(&small),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("too small"), "{err}");
    assert!(
        !small.exists(),
        "a failed conversion left {}",
        small.display()
    );

    // Bad dictionaries: an OCI image that was never converted, a path that is no image, and
    // a converted image whose blob was damaged. Each is refused by name, leaving nothing.
    let dict_out = t.join("out-dict");
    let o = run(
        lsmctl(["convert", "-q", "--no-reuse", "--tag", "t", "--dict"])
            .arg(t.join("srcS"))
            .arg(t.join("srcS"))
            .arg(&dict_out),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("no lsm layers"),
        "{err}"
    );
    let o = run(
        lsmctl(["convert", "-q", "--no-reuse", "--tag", "t", "--dict"])
            .arg(t.join("nowhere"))
            .arg(t.join("srcS"))
            .arg(&dict_out),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("nowhere"), "{err}");
    let good = t.join("converted");
    assert!(convert(&t.join("srcS"), &good).status.success());
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(good.join("lsm-image.json")).expect("config"))
            .expect("json");
    let lsm_blob = good.join(cfg["layers"][0]["source"]["local"].as_str().expect("path"));
    let mut bytes = std::fs::read(&lsm_blob).expect("read");
    bytes[100] ^= 1;
    std::fs::remove_file(&lsm_blob).expect("unlink"); // (a hard link into the reuse database)
    std::fs::write(&lsm_blob, &bytes).expect("damage");
    let o = run(
        lsmctl(["convert", "-q", "--no-reuse", "--tag", "t", "--dict"])
            .arg(&good)
            .arg(t.join("srcS"))
            .arg(&dict_out),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("does not match its digest"),
        "{err}"
    );
    assert!(
        !dict_out.exists(),
        "a failed conversion left {}",
        dict_out.display()
    );

    // A missing image.
    let o = run(lsmctl(["convert", "-q", "--tag", "nope"])
        .arg(t.join("srcS"))
        .arg(t.join("x")));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("no image tagged"),
        "{err}"
    );

    // A corrupt layer blob.
    let src = t.join("src");
    whiteout_image(&src);
    let blobs: Vec<PathBuf> = std::fs::read_dir(src.join("blobs/sha256"))
        .expect("blobs")
        .map(|e| e.expect("entry").path())
        .collect();
    let layer = blobs
        .iter()
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .expect("a blob");
    let mut bytes = std::fs::read(layer).expect("read");
    let n = bytes.len() / 2;
    bytes[n] ^= 0xff;
    std::fs::write(layer, bytes).expect("write");
    let out = t.join("out-corrupt");
    let o = convert(&src, &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("does not match its digest"),
        "{err}"
    );
    assert!(!out.join("index.json").exists());
}

#[test]
fn pushed_to_a_registry_served_from_it_and_not_uploaded_twice() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let (src, reference) = source_and_reference(t);
    let reg = lsm_e2e::registry::Registry::start(&t.join("registry"), None);
    let target = format!("{}/lsm/converted:t", reg.url);

    let push = |dst: &Path| {
        run(lsmctl([
            "convert",
            "--no-reuse",
            "--tag",
            "t",
            "--insecure",
            "--push",
            &target,
        ])
        .arg(&src)
        .arg(dst))
    };
    let o = push(&t.join("dst"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && err.contains("5 blobs uploaded, 0 already there"),
        "{err}"
    );
    check_containerd_contract(&reg, &target);
    // Converting again gives the same blobs: nothing is uploaded a second time.
    let o = push(&t.join("dst2"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && err.contains("0 blobs uploaded, 5 already there"),
        "{err}"
    );

    // Straight to the registry (another tag of the same repository): the blobs are there.
    let o = run(
        lsmctl(["convert", "--no-reuse", "--insecure", "--tag", "t"])
            .arg(&src)
            .arg(format!("{}/lsm/converted:direct", reg.url)),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && err.contains("0 blobs uploaded, 5 already there"),
        "{err}"
    );

    // The source pushed with skopeo and converted straight from the registry: the same layers.
    ok(Command::new("skopeo")
        .args(["copy", "--insecure-policy", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:t", src.display()))
        .arg(format!(
            "docker://{}/lsm/source:t",
            reg.url.trim_start_matches("http://")
        )));
    let o = run(lsmctl(["convert", "-q", "--no-reuse", "--insecure"])
        .arg(format!("{}/lsm/source:t", reg.url))
        .arg(t.join("dst3")));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let layers = |d: &str| {
        let m: serde_json::Value = serde_json::from_slice(
            &std::fs::read(t.join(d).join("lsm-image.json")).expect("config"),
        )
        .expect("json");
        m["layers"].to_string()
    };
    assert_eq!(
        layers("dst3"),
        layers("dst"),
        "converting from the registry changed the layers"
    );

    // lsmd reads the pushed layers from the registry; the tree is umoci's.
    let files = t.join("files");
    let name = format!("img={}", t.join("dst/lsm-remote.json").display());
    let d = Lsmd::start_fuse(&t.join("lsmd.sock"), OsStr::new(&name), &files, &[]);
    {
        let m = Mounted::with(&files.join("img"), &t.join("mnt"), true);
        assert_eq!(metadata(&reference), metadata(&m.dir));
    }
    d.terminate();
}

#[test]
fn a_shared_base_is_converted_once_across_a_batch_and_runs() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let base = TarLayer::new()
        .dir("etc")
        .file("etc/os-release", "base\n")
        .finish();
    let a = TarLayer::new().file("a.txt", "image a").finish();
    let b = TarLayer::new().file("b.txt", "image b").finish();
    // The same base, compressed in one image and not in the other.
    oci_layout(&t.join("srcA"), &[(base.clone(), true), (a, true)]);
    oci_layout(&t.join("srcB"), &[(base, false), (b, false)]);
    let list = t.join("list.txt");
    let lines = |n: &str| {
        format!(
            "# two images sharing a base\n{} {} t\n{} {} t\n",
            t.join("srcA").display(),
            t.join(format!("dstA{n}")).display(),
            t.join("srcB").display(),
            t.join(format!("dstB{n}")).display()
        )
    };
    std::fs::write(&list, lines("1")).expect("list");
    let batch = || {
        run(lsmctl(["convert", "--jobs", "1", "--batch"])
            .arg(&list)
            .arg("--db")
            .arg(t.join("db")))
    };
    let o = batch();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && err.contains("2 images (0 failed), layers 3 converted, 1 reused"),
        "{err}"
    );
    let first = |d: &str| {
        let m: serde_json::Value = serde_json::from_slice(
            &std::fs::read(t.join(d).join("lsm-image.json")).expect("config"),
        )
        .expect("json");
        m["layers"][0]["digest"].to_string()
    };
    assert_eq!(
        first("dstA1"),
        first("dstB1"),
        "the shared base was converted twice"
    );
    // Another run: everything comes from the database.
    std::fs::write(&list, lines("2")).expect("list");
    let o = batch();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && err.contains("layers 0 converted, 4 reused"),
        "{err}"
    );
    assert_eq!(first("dstA2"), first("dstA1"));
}

/// The bottom layer streams into the work tree while it is spooled, in a place chosen from its
/// gzip trailer's size; a layer much larger than that (a two-member gzip whose trailer names
/// only the last member) cuts the stream, and the layer is applied again from the spool. Both
/// ways, and with `--work-dir` (streamed, never cut), give the same converted layers.
#[test]
fn a_bottom_layer_larger_than_its_gzip_trailer_says_converts_the_same() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let big = "0123456789abcdef".repeat(1 << 19); // 8 MiB that compress to little
    let tar = TarLayer::new()
        .dir("etc")
        .file_as("etc/shadow", "root:*:1::::::\n", 0o640, 0, 42)
        .xattr("user.lsm", "bottom")
        .file("big", &big)
        .finish();
    let top = TarLayer::new().file(".wh.big", "").finish();
    oci_layout(&t.join("one"), &[(tar.clone(), true), (top.clone(), true)]);
    // The same tar as two gzip members: the trailer of the last one says 1 KiB.
    let cut = tar.len() - 1024;
    let mut two = gzip(&tar[..cut]);
    two.extend_from_slice(&gzip(&tar[cut..]));
    let dir = t.join("two");
    let put = |b: &[u8]| put_oci_blob(&dir, b);
    let mut descs = Vec::new();
    for bytes in [two, gzip(&top)] {
        let media = "application/vnd.oci.image.layer.v1.tar+gzip";
        descs.push(
            serde_json::json!({"mediaType": media, "digest": put(&bytes), "size": bytes.len()}),
        );
    }
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha(&tar), sha(&top)]},
    });
    finish_oci_layout(&dir, &config, descs, "t");
    let layers = |src: &str, dst: &str, work_dir: bool| {
        let mut c = lsmctl(["convert", "--no-reuse", "--tag", "t"]);
        c.arg(t.join(src)).arg(t.join(dst));
        if work_dir {
            std::fs::create_dir(t.join("wd")).expect("work dir");
            c.arg("--work-dir").arg(t.join("wd"));
        }
        let o = run(c.env("LSM_CONVERT_TIMING", "1"));
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{err}");
        let m: serde_json::Value = serde_json::from_slice(
            &std::fs::read(t.join(dst).join("lsm-image.json")).expect("config"),
        )
        .expect("json");
        let digests: Vec<String> = (0..2)
            .map(|i| m["layers"][i]["digest"].to_string())
            .collect();
        (digests, err.contains("streamed apply is not kept"))
    };
    let (plain, redone) = layers("one", "out-one", false);
    assert!(!redone, "a truthful trailer's stream was not kept");
    let (cut_stream, redone) = layers("two", "out-two", false);
    assert!(redone, "a stream past its trailer's size was kept");
    assert_eq!(plain, cut_stream);
    let (in_work_dir, _) = layers("two", "out-wd", true);
    assert_eq!(plain, in_work_dir);
}

/// A whiteout naming `.` or `..` (`.wh..`, `.wh...`) would delete its own directory or the one
/// above (at the top: the work tree itself); it is refused, naming the entry.
#[test]
fn whiteouts_of_dot_and_dotdot_are_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    for (i, evil) in [".wh...", "d/.wh...", ".wh..", "d/.wh.."]
        .iter()
        .enumerate()
    {
        let base = TarLayer::new().dir("d").file("d/keep", "k").finish();
        let bad = TarLayer::new().file(evil, "").finish();
        let src = t.join(format!("src{i}"));
        oci_layout(&src, &[(base, false), (bad, false)]);
        let out = t.join(format!("out{i}"));
        let o = convert(&src, &out);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("climbs out") && err.contains(evil),
            "{evil}: {err}"
        );
        assert!(
            !out.join("index.json").exists(),
            "{evil}: an image was written"
        );
    }
}

/// The work tree (the image's setuid files and device nodes, unpacked) is private while the
/// conversion runs, and SIGTERM or SIGINT in the middle leaves none of it behind.
#[test]
fn the_work_tree_is_private_and_a_signal_removes_it() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    // 96 MiB of incompressible files: long enough to catch the conversion in the middle.
    let mut layer = TarLayer::new()
        .dir("data")
        .file_as("data/suid", "#!/bin/sh\n", 0o4755, 0, 0);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for f in 0..48 {
        let body: String = (0..2 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (b'!' + (x % 90) as u8) as char
            })
            .collect();
        layer = layer.file(&format!("data/f{f}"), &body);
    }
    let src = t.join("src");
    oci_layout(&src, &[(layer.finish(), false)]);
    for sig in ["TERM", "INT"] {
        let out = t.join(format!("out-{sig}"));
        // (Named, so the test finds it: by default it may be in /dev/shm or inside DST.)
        let wd = t.join(format!("wd-{sig}"));
        std::fs::create_dir(&wd).expect("work dir");
        let mut child = lsmctl(["convert", "-q", "--no-reuse", "--tag", "t"])
            .arg(&src)
            .arg(&out)
            .arg("--work-dir")
            .arg(&wd)
            .spawn()
            .expect("convert");
        let work = wd.join(format!(".lsm-convert-{}-", child.id()));
        let find = || {
            std::fs::read_dir(&wd)
                .ok()?
                .flatten()
                .map(|e| e.path())
                .find(|p| p.to_string_lossy().starts_with(&*work.to_string_lossy()))
        };
        let start = std::time::Instant::now();
        let (work, mode) = loop {
            if let Some(w) = find() {
                if let Ok(m) = std::fs::symlink_metadata(&w) {
                    if w.join("root/data").exists() {
                        break (w.clone(), m.permissions().mode() & 0o7777);
                    }
                }
            }
            assert!(
                matches!(child.try_wait(), Ok(None)),
                "the conversion ended before it could be observed"
            );
            assert!(start.elapsed().as_secs() < 120, "no work tree appeared");
            std::thread::sleep(std::time::Duration::from_millis(2));
        };
        assert_eq!(mode, 0o700, "work tree mode {mode:o} while converting");
        ok(Command::new("kill").args([&format!("-{sig}"), &child.id().to_string()]));
        let status = child.wait().expect("wait");
        assert!(!status.success(), "SIG{sig}: {status}");
        assert!(
            !work.exists(),
            "SIG{sig} left the work tree {}",
            work.display()
        );
        assert!(!out.join(".convert-dict").exists());
    }
}

/// The pushed image is what containerd expects (CONTRACT, FORMAT.md §7): every blob an OCI tar
/// layer with its role and the `containerd.io/snapshot/lsm.*` annotations, and the config's
/// diff_ids = the blobs' digests, as many as the manifest lists.
fn check_containerd_contract(reg: &lsm_e2e::registry::Registry, target: &str) {
    let (repo_url, tag) = target.rsplit_once(':').expect("tag");
    let (base, repo) = repo_url.split_at(reg.url.len());
    let get = |what: &str| -> serde_json::Value {
        reg.agent()
            .get(&format!("{base}/v2{repo}/{what}"))
            .set("Accept", "application/vnd.oci.image.manifest.v1+json")
            .call()
            .expect("get")
            .into_string()
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .expect("json")
    };
    let m = get(&format!("manifests/{tag}"));
    let layers = m["layers"].as_array().expect("layers");
    let config = get(&format!(
        "blobs/{}",
        m["config"]["digest"].as_str().expect("digest")
    ));
    let diff_ids: Vec<&serde_json::Value> = layers.iter().map(|l| &l["digest"]).collect();
    assert_eq!(
        config["rootfs"]["diff_ids"]
            .as_array()
            .expect("diff_ids")
            .iter()
            .collect::<Vec<_>>(),
        diff_ids
    );
    let repository = format!("{}{repo}", reg.url.trim_start_matches("http://"));
    for (i, l) in layers.iter().enumerate() {
        let a = &l["annotations"];
        // The stacked layers, then the hash index (FORMAT.md §8).
        let role = if i + 1 == layers.len() {
            "hash-index"
        } else {
            "layer"
        };
        assert_eq!(l["mediaType"], "application/vnd.oci.image.layer.v1.tar");
        assert_eq!(a["io.lsm.layer.role"], role);
        assert_eq!(a["containerd.io/snapshot/lsm.role"], role);
        assert_eq!(a["containerd.io/snapshot/lsm.digest"], l["digest"]);
        assert_eq!(a["containerd.io/snapshot/lsm.size"], l["size"].to_string());
        assert_eq!(
            a["containerd.io/snapshot/lsm.meta-digest"],
            a["io.lsm.layer.meta-digest"]
        );
        assert_eq!(
            a["containerd.io/snapshot/lsm.disk-size"],
            m["annotations"]["io.lsm.disk-size"]
        );
        assert_eq!(
            a["containerd.io/snapshot/lsm.repository"],
            repository.as_str()
        );
    }
    assert!(m["annotations"]["io.lsm.source-config"].is_string());
}

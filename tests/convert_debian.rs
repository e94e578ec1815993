//! Real images from Debian packages, end to end: `debootstrap --variant=minbase bookworm` as a
//! base image and the same plus python3 installed with apt, made with umoci (cached outside the
//! clone), pushed with skopeo to a real registry, converted from there in one batch (the second
//! image reuses the converted base), served by lsmd through the FUSE file and mounted by the
//! kernel: the tree equals umoci's own unpack — contents, modes, owners, links, xattrs.

use std::ffi::OsStr;
use std::process::Command;

use lsm_e2e::nbd::*;
use lsm_e2e::registry::Registry;
use lsm_e2e::tree::*;
use lsm_e2e::*;

#[test]
fn debian_minbase_and_python_images_convert_and_mount_like_umoci_unpacks_them() {
    let oci = debian_images("debian-v1");
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let reg = Registry::start(&t.join("registry"), None);
    let host = reg.url.trim_start_matches("http://").to_string();
    for tag in ["base", "py"] {
        ok(Command::new("skopeo")
            .args(["copy", "-q", "--insecure-policy", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:{tag}", oci.display()))
            .arg(format!("docker://{host}/debian/{tag}:1")));
    }
    let list = t.join("images.txt");
    std::fs::write(
        &list,
        format!(
            "{0}/debian/base:1 {1}/base\n{0}/debian/py:1 {1}/py\n",
            reg.url,
            t.display()
        ),
    )
    .expect("list");
    // One disk size for both, so the python image can reuse the converted base.
    let o = run(lsmctl([
        "convert",
        "--insecure",
        "--size",
        "1G",
        "--jobs",
        "1",
        "--batch",
    ])
    .arg(&list)
    .arg("--db")
    .arg(t.join("db")));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && err.contains("2 images (0 failed), layers 2 converted, 1 reused"),
        "{err}"
    );
    eprintln!("{}", err.lines().last().unwrap_or_default());

    // umoci's unpack of the python image is the reference.
    let bundle = t.join("bundle");
    ok(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:py", oci.display()))
        .arg(&bundle));
    let name = format!("py={}", t.join("py/lsm-image.json").display());
    let files = t.join("files");
    let d = Lsmd::start_fuse(&t.join("lsmd.sock"), OsStr::new(&name), &files, &[]);
    {
        let m = Mounted::with(&files.join("py"), &t.join("mnt"), true);
        assert_same_tree(&bundle.join("rootfs"), &m.dir, None);
        assert!(m.dir.join("usr/bin/python3").exists(), "python3 missing");
    }
    d.terminate();
}

//! The NAS source against a misbehaving network filesystem: each blob is served by `nbdkit`
//! with its `error` filter failing reads at random, mounted as a file with `nbdfuse` (a real
//! FUSE mount the kernel reads through). Reads are retried and the disk comes out exact; a
//! mount that is gone gives a clear error.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use lsm_e2e::nbd::*;
use lsm_e2e::*;

/// A blob file exposed through nbdkit (with `filter_args`) on a FUSE mount; unmounted on drop.
struct FlakyMount {
    child: Child,
    dir: PathBuf,
}

impl FlakyMount {
    fn start(blob: &Path, dir: &Path, filter_args: &[&str]) -> FlakyMount {
        std::fs::create_dir_all(dir).expect("mountpoint");
        let child = Command::new("nbdfuse")
            .arg("-r")
            .arg(dir.join("blob"))
            .args(["--command", "nbdkit", "-s", "--filter=error", "file"])
            .arg(blob)
            .args(filter_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nbdfuse (apt install libnbd-bin nbdkit)");
        for _ in 0..200 {
            if dir.join("blob").exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        FlakyMount {
            child,
            dir: dir.to_path_buf(),
        }
    }

    fn file(&self) -> PathBuf {
        self.dir.join("blob")
    }

    fn unmount(&mut self) {
        let _ = Command::new("umount")
            .arg(&self.dir)
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for FlakyMount {
    fn drop(&mut self) {
        let _ = self.child.kill();
        self.unmount();
    }
}

#[test]
fn flaky_network_filesystem_reads_are_retried_and_a_gone_mount_is_named() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let mut data = vec![0u8; 16 << 20];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for b in data.iter_mut().take(12 << 20) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let (img, raw) = image_from_bytes(t, &data, &[]);
    // 30 % of reads fail at the source.
    let mut mount = FlakyMount::start(
        &t.join("base.blob"),
        &t.join("mnt"),
        &["error-pread-rate=30%"],
    );
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&img).expect("read")).expect("json");
    v["layers"][0]["source"] =
        serde_json::json!({ "nas": { "path": mount.file(), "read_timeout_ms": 2000 } });
    let nas = t.join("nas.json");
    std::fs::write(&nas, v.to_string()).expect("write");

    let sock = t.join("lsmd.sock");
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let d = Lsmd::start(
        &sock,
        &[
            OsStr::new("--config"),
            nas.as_os_str(),
            OsStr::new("--metrics"),
            OsStr::new(&metrics),
        ],
    );
    let copy = t.join("copy.raw");
    ok(Command::new("nbdcopy").arg(d.uri()).arg(&copy));
    assert_eq!(sha256_file(&copy), sha256_file(&raw));
    let text = ureq::get(&format!("http://{metrics}/metrics"))
        .call()
        .expect("metrics")
        .into_string()
        .expect("text");
    let errors: f64 = text
        .lines()
        .find(|l| l.starts_with("lsm_source_errors_total{source=\"nas\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("nas errors metric");
    assert!(
        errors > 0.0,
        "no read failed: the fault injector did nothing"
    );
    eprintln!("NAS: {errors} failed reads retried");
    d.terminate();

    // The mount goes away: lsmd refuses to start and says what looks wrong.
    mount.unmount();
    let o = run(Command::new(bin("lsmd"))
        .args(["serve", "--config"])
        .arg(&nas)
        .arg("--socket")
        .arg(t.join("x.sock")));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("still mounted"),
        "{err}"
    );
}

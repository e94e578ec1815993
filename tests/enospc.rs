//! A full disk under the upper layer, caused for real: the upper layer lives on a 64 MiB tmpfs
//! mounted by the test, with a filler file beside it. fio (nbd engine) fills it until the
//! filesystem refuses; the client must see ENOSPC (not EIO, so qemu's `werror=enospc` can pause
//! a VM), lsmd must stay up, and once the filler is deleted writes must succeed again — and
//! every block flushed before, during and after is still there, also after lsmd is killed -9
//! and restarted. Needs root (mount).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use lsm_e2e::nbd::*;
use lsm_e2e::*;

/// A tmpfs mounted for the test; lazily unmounted when dropped (also after a failed assert).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mountpoint");
        ok(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "lsm-enospc"])
            .arg(dir));
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// fio arguments writing `[offset, offset+size)` sequentially in 64 KiB blocks, each carrying a
/// crc32c header (the same arguments verify it later), with `extra` added.
fn region(offset: &str, size: &str, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--rw=write",
        "--bs=64k",
        "--iodepth=8",
        "--verify=crc32c",
        &format!("--offset={offset}"),
        &format!("--size={size}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a.push("--name=region".into());
    a
}

fn fio_region(uri: &str, offset: &str, size: &str, extra: &[&str]) -> (bool, String) {
    let args = region(offset, size, extra);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    fio(uri, &refs)
}

fn alive(d: &Lsmd) -> bool {
    Command::new("kill")
        .args(["-0", &d.pid().to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

fn metrics(addr: &str) -> String {
    ureq::get(&format!("http://{addr}/metrics"))
        .call()
        .expect("metrics")
        .into_string()
        .expect("metrics text")
}

/// The value of the sample `series` (name and labels, exactly as exposed).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

#[test]
fn full_upper_filesystem_is_enospc_then_writes_resume_and_flushed_data_survives() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let fs = Tmpfs::mount(&t.join("fs"), "64M");
    // 16 MiB of someone else's data on the same filesystem, deleted later to free space.
    let filler = fs.0.join("filler");
    ok(Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=16", "status=none"])
        .arg(format!("of={}", filler.display())));
    let img = t.join("img.json");
    ok(lsmctl(["create"])
        .arg(&img)
        .args(["--size", "256M", "--upper"])
        .arg(fs.0.join("upper")));
    let sock = t.join("lsmd.sock");
    let addr = format!("127.0.0.1:{}", free_port());
    let args = [
        OsStr::new("--config"),
        img.as_os_str(),
        OsStr::new("--metrics"),
        OsStr::new(&addr),
    ];
    let d = Lsmd::start(&sock, &args);
    let uri = d.uri();

    // 1. 16 MiB written, flushed (fio's end_fsync is an NBD FLUSH) and verified.
    let (pass, out) = fio_region(&uri, "0", "16M", &["--end_fsync=1", "--do_verify=1"]);
    assert!(pass, "first region failed:\n{out}\nlsmd: {}", d.log());

    // 2. Fill: 224 MiB more cannot fit in the ~32 MiB left. The client sees ENOSPC, not EIO.
    let (pass, out) = fio_region(&uri, "16M", "224M", &["--do_verify=0"]);
    assert!(!pass, "224 MiB fit on a 64 MiB filesystem?\n{out}");
    assert!(
        out.contains("No space left on device"),
        "fio did not see ENOSPC:\n{out}\nlsmd: {}",
        d.log()
    );
    assert!(
        !out.contains("Input/output error"),
        "a full disk reached the client as EIO:\n{out}"
    );
    // The same through qemu-io, which qemu's werror=enospc policy acts on.
    let q = run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x77 32M 64M", &uri]));
    let q_out =
        String::from_utf8_lossy(&q.stdout).to_string() + &String::from_utf8_lossy(&q.stderr);
    assert!(
        q_out.contains("No space left on device"),
        "qemu-io did not see ENOSPC:\n{q_out}"
    );
    assert!(alive(&d), "lsmd died on a full disk: {}", d.log());
    let m = metrics(&addr);
    assert!(
        sample(&m, "lsm_no_space_errors_total{export=\"img\"}") > 0.0,
        "{m}"
    );
    assert_eq!(sample(&m, "lsm_upper_failed{export=\"img\"}"), 0.0, "{m}");
    // What was flushed before the disk filled is intact while it is full.
    let (pass, out) = fio_region(&uri, "0", "16M", &["--verify_only"]);
    assert!(pass, "flushed data damaged by the full disk:\n{out}");

    // 3. Space freed: writes and flushes succeed again.
    std::fs::remove_file(&filler).expect("remove filler");
    let (pass, out) = fio_region(&uri, "200M", "8M", &["--end_fsync=1", "--do_verify=1"]);
    assert!(
        pass,
        "writes did not resume after space was freed:\n{out}\nlsmd: {}",
        d.log()
    );
    let m = metrics(&addr);
    assert!(
        sample(&m, "lsm_flush_total{export=\"img\",frontend=\"nbd\"}") >= 2.0,
        "{m}"
    );

    // 4. Nothing flushed is lost, even without a clean shutdown.
    d.kill9();
    let d = Lsmd::start(&sock, &args);
    for (offset, size) in [("0", "16M"), ("200M", "8M")] {
        let (pass, out) = fio_region(&d.uri(), offset, size, &["--verify_only"]);
        assert!(
            pass,
            "flushed region {offset}+{size} lost after kill -9 and restart:\n{out}\nlsmd: {}",
            d.log()
        );
    }
    // Control: the verify pass checks something — a region never written fails it.
    let (pass, _) = fio_region(&d.uri(), "240M", "1M", &["--verify_only"]);
    assert!(!pass, "verifying a never-written region passed");
    drop(d);
    drop(fs);
}

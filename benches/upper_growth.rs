//! Upper-layer growth under overwrites (issue: "the upper layer's growth is bounded"): random
//! 4 KiB overwrites totalling ten times the disk size, a FLUSH every 64 writes, with the
//! default policy and with checkpoints and compaction off (format v3 still puts writes in
//! dead space once a synced flush mark covers what replaced it). Prints the files' size
//! against the live data (worst and final), write rate, compactions, checkpoints, and then the
//! time and peak memory of reopening each layer (recovery reads the log in fixed-size blocks,
//! so memory follows the live map, not the log).
//!
//! `cargo bench -p lsm-benches --bench upper_growth` (`UPPER_BENCH_DISK_MIB`, default 256; the
//! scratch directory is `UPPER_BENCH_DIR`, default a temporary one under /var/tmp).

use std::path::Path;
use std::time::Instant;

use blockfmt::upper::CompactionPolicy;
use blockfmt::UpperLayer;
use rand::{rngs::StdRng, Rng, SeedableRng};

const FLUSH_EVERY: u64 = 64;

struct Row {
    policy: &'static str,
    worst: f64,
    last: f64,
    files_mib: f64,
    live_mib: f64,
    writes_per_s: f64,
    compactions: u64,
    checkpoints: u64,
    reopen_s: f64,
    reopen_peak_mib: f64,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--reopen") {
        reopen_child(&args[i + 1], &args[i + 2]);
        return;
    }
    if args.iter().any(|a| a == "--list") {
        return; // `cargo bench -- --list`
    }
    let disk_mib: u64 = std::env::var("UPPER_BENCH_DISK_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let base = std::env::var("UPPER_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let tmp = tempfile::tempdir_in(base).expect("scratch dir");
    let size = disk_mib << 20;
    let mut rows = Vec::new();
    for (policy, p) in [
        ("default policy", CompactionPolicy::default()),
        ("no checkpoint or compaction", CompactionPolicy::never()),
    ] {
        let dir = tmp.path().join(policy.replace(' ', "-"));
        rows.push(run(&dir, size, policy, p));
        std::fs::remove_dir_all(&dir).expect("clean");
    }
    println!(
        "\nUpper layer, {disk_mib} MiB disk, {} MiB of random 4 KiB overwrites, FLUSH every {FLUSH_EVERY}:\n",
        disk_mib * 10
    );
    println!("| policy | files / live, worst | files / live, end | files MiB | live MiB | writes/s | compactions | checkpoints | reopen s | reopen peak RSS MiB |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in rows {
        println!(
            "| {} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} | {} | {} | {:.2} | {:.0} |",
            r.policy,
            r.worst,
            r.last,
            r.files_mib,
            r.live_mib,
            r.writes_per_s,
            r.compactions,
            r.checkpoints,
            r.reopen_s,
            r.reopen_peak_mib
        );
    }
}

fn run(dir: &Path, size: u64, policy: &'static str, p: CompactionPolicy) -> Row {
    let up = UpperLayer::create(dir, size).expect("create");
    up.set_compaction(p);
    let blocks = size / 4096;
    let mut rng = StdRng::seed_from_u64(1);
    let mut buf = vec![0u8; 4096];
    let t = Instant::now();
    let mut worst = 0f64;
    let n = 10 * blocks;
    for i in 0..n {
        rng.fill(&mut buf[..]);
        up.write(rng.gen_range(0..blocks) * 4096, &buf)
            .expect("write");
        if i % FLUSH_EVERY == FLUSH_EVERY - 1 {
            up.flush().expect("flush");
        }
        // Once the disk is mostly written, the ratio means something.
        if i >= blocks && i % 256 == 0 {
            let s = up.stats();
            worst = worst.max((s.data_file_bytes + s.log_bytes) as f64 / s.live_bytes as f64);
        }
        if i % (n / 10) == 0 {
            eprint!("\r{policy}: {}%", i * 100 / n);
        }
    }
    up.flush().expect("flush");
    let secs = t.elapsed().as_secs_f64();
    let s = up.stats();
    let files = s.data_file_bytes + s.log_bytes;
    eprintln!("\r{policy}: done in {secs:.1} s");
    drop(up);
    let (reopen_s, reopen_peak_mib) = reopen_in_child(dir, size);
    Row {
        policy,
        worst,
        last: files as f64 / s.live_bytes as f64,
        files_mib: files as f64 / 1048576.0,
        live_mib: s.live_bytes as f64 / 1048576.0,
        writes_per_s: n as f64 / secs,
        compactions: s.compactions,
        checkpoints: s.checkpoints,
        reopen_s,
        reopen_peak_mib,
    }
}

/// Reopens the layer in a fresh process, so its peak RSS is recovery's alone.
fn reopen_in_child(dir: &Path, size: u64) -> (f64, f64) {
    let exe = std::env::current_exe().expect("exe");
    let out = std::process::Command::new(exe)
        .arg("--reopen")
        .arg(dir)
        .arg(size.to_string())
        .output()
        .expect("child");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text
        .split_whitespace()
        .filter_map(|w| w.parse::<f64>().ok());
    (it.next().unwrap_or(f64::NAN), it.next().unwrap_or(f64::NAN))
}

fn reopen_child(dir: &str, size: &str) {
    let size: u64 = size.parse().expect("size");
    let t = Instant::now();
    let (up, rec) = UpperLayer::open(Path::new(dir), size).expect("reopen");
    let secs = t.elapsed().as_secs_f64();
    drop(up);
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let hwm_kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    eprintln!("replayed {} operations", rec.replayed);
    println!("{secs} {}", hwm_kib / 1024.0);
}

//! No client of lsmd can stall another: real misbehaving clients (a raw NBD client that stops
//! reading its replies, one that connects and says nothing, one that stays idle, more clients
//! than the cap, a huge metrics request line) next to real clients (qemu-io, nbdinfo) that
//! must still be served. Bounds on time are generous: they tell "served" from "stuck".

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use lsm_e2e::nbd::*;
use lsm_e2e::*;

/// A 64 MiB disk with data in its first 4 MiB.
fn image(t: &Path) -> std::path::PathBuf {
    let mut data = vec![0u8; 64 << 20];
    for (i, b) in data.iter_mut().enumerate().take(4 << 20) {
        *b = (i / 4096) as u8 ^ (i % 13) as u8;
    }
    image_from_bytes(t, &data, &[]).0
}

fn start(t: &Path, extra: &[&str]) -> Lsmd {
    let img = image(t);
    let mut args = vec![OsStr::new("--config"), img.as_os_str()];
    args.extend(extra.iter().map(OsStr::new));
    Lsmd::start(&t.join("lsmd.sock"), &args)
}

/// Runs `cmd`, killing it after `limit`; `None` if it had to be killed.
fn run_within(cmd: &mut Command, limit: Duration) -> Option<Output> {
    let mut child: Child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(_)) = child.try_wait() {
            return child.wait_with_output().ok();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// True once `s` reads end-of-file (or a reset) within `limit`: the server closed it.
fn closed_by_server(s: &mut UnixStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).expect("timeout");
    let mut sink = vec![0u8; 1 << 20];
    let start = Instant::now();
    loop {
        match s.read(&mut sink) {
            Ok(0) => return true,
            Ok(_) if start.elapsed() < limit => continue,
            Ok(_) => return false,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

fn wait_for_log(d: &Lsmd, needle: &str, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if d.log().contains(needle) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn a_client_that_stops_reading_replies_stalls_no_one_and_is_dropped() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    // Two shared workers: before isolation, the stuck client's replies held both.
    let d = start(t, &["--workers", "2", "--write-timeout", "20"]);

    // Negotiates, then asks for 64 reads of 32 MiB (each served by the pool) and never reads.
    let mut stuck = RawClient::connect(&d.socket).expect("connect");
    for i in 0..64 {
        stuck.send(CMD_READ, i, 0, 32 << 20, &[]).expect("send");
    }
    std::thread::sleep(Duration::from_secs(1));

    // Real clients are served while it is stuck: a 1 MiB read goes to the pool too.
    let unix = d.uri();
    let o = run_within(
        Command::new("qemu-io").args(["-f", "raw", "-r", "-c", "read -P 0 8M 1M", &unix]),
        Duration::from_secs(10),
    )
    .expect("qemu-io was not served within 10 s while another client was stuck");
    assert!(o.status.success(), "qemu-io: {o:?}");
    let o = run_within(Command::new("nbdinfo").arg(&unix), Duration::from_secs(10))
        .expect("nbdinfo was not served within 10 s while another client was stuck");
    assert!(o.status.success(), "nbdinfo: {o:?}");

    // After the write timeout the stuck connection is dropped.
    assert!(
        wait_for_log(&d, "dropping the connection", Duration::from_secs(90)),
        "the stuck client was never dropped: {}",
        d.log()
    );
    assert!(closed_by_server(&mut stuck.stream, Duration::from_secs(30)));
    // And the daemon still serves everyone.
    let o = run_within(
        Command::new("qemu-io").args(["-f", "raw", "-r", "-c", "read -P 0 8M 4M", &unix]),
        Duration::from_secs(30),
    )
    .expect("qemu-io after the drop");
    assert!(o.status.success(), "qemu-io: {o:?}");
}

#[test]
fn silent_idle_and_surplus_clients_are_dropped() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let d = start(
        t,
        &[
            "--handshake-timeout",
            "2",
            "--idle-timeout",
            "3",
            "--max-connections",
            "3",
        ],
    );
    let unix = d.uri();

    // Connects and sends nothing: dropped at the handshake timeout.
    let mut silent = UnixStream::connect(&d.socket).expect("connect");
    let mut hello = [0u8; 18];
    silent.read_exact(&mut hello).expect("hello");
    assert_eq!(&hello[..8], b"NBDMAGIC");
    assert!(
        closed_by_server(&mut silent, Duration::from_secs(30)),
        "a client that sent nothing was not dropped"
    );
    // Half a handshake, then nothing: dropped too.
    let mut half = UnixStream::connect(&d.socket).expect("connect");
    half.read_exact(&mut hello).expect("hello");
    half.write_all(&3u32.to_be_bytes()).expect("flags");
    half.write_all(b"IHAVE").expect("half an option");
    assert!(closed_by_server(&mut half, Duration::from_secs(30)));

    // Negotiated, then idle with nothing in flight: dropped at the idle timeout; a client that
    // keeps working is not.
    let mut idle = RawClient::connect(&d.socket).expect("connect");
    let mut busy = RawClient::connect(&d.socket).expect("connect");
    for _ in 0..12 {
        assert!(busy.read(0, 4096).expect("read").is_ok());
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(closed_by_server(&mut idle.stream, Duration::from_secs(30)));
    assert!(busy
        .read(0, 4096)
        .expect("busy client still served")
        .is_ok());

    // The cap: `busy` plus two more are served, a fourth is closed at once; a slot freed is
    // given to the next client.
    let second = RawClient::connect(&d.socket).expect("second");
    let third = RawClient::connect(&d.socket).expect("third");
    let mut fourth = UnixStream::connect(&d.socket).expect("connect");
    assert!(
        closed_by_server(&mut fourth, Duration::from_secs(30)),
        "a connection over --max-connections was served"
    );
    assert!(d.log().contains("--max-connections reached"), "{}", d.log());
    drop(second);
    drop(third);
    let start = Instant::now();
    loop {
        let o = run_within(Command::new("nbdinfo").arg(&unix), Duration::from_secs(10));
        if o.as_ref().is_some_and(|o| o.status.success()) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no slot freed: {o:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(busy
        .read(0, 4096)
        .expect("busy client still served")
        .is_ok());
}

/// Peak resident memory of process `pid`, KiB.
fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM")
}

#[test]
fn a_huge_or_silent_metrics_request_does_not_grow_or_block_lsmd() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let d = start(t, &["--metrics", &metrics]);
    let url = format!("http://127.0.0.1:{port}/metrics");
    let get = || {
        ureq::get(&url)
            .timeout(Duration::from_secs(30))
            .call()
            .map(|r| r.status())
            .map_err(|e| e.to_string())
    };
    assert_eq!(get().expect("metrics"), 200);
    let before = vm_hwm_kib(d.pid());

    // A 190 MB request line: lsmd reads a few KiB of it and hangs up.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_write_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let block = vec![b'A'; 1 << 20];
    let _ = s.write_all(b"GET /");
    let mut sent = 0u64;
    for _ in 0..190 {
        match s.write_all(&block) {
            Ok(()) => sent += block.len() as u64,
            Err(_) => break, // the server closed the connection
        }
    }
    drop(s);
    assert!(
        sent < 190 << 20,
        "lsmd read a 190 MB request line to the end"
    );
    let after = vm_hwm_kib(d.pid());
    assert!(
        after < before + 64 * 1024,
        "lsmd's peak RSS grew from {before} KiB to {after} KiB on one request line"
    );
    assert_eq!(get().expect("metrics after the huge line"), 200);

    // A client that connects and sends nothing delays others only until the request timeout.
    let _silent = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    assert_eq!(get().expect("metrics with a silent client"), 200);
}

/// Resident memory of process `pid` now, KiB.
fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// A connection does not keep the buffer of its largest request: 16 clients that each sent one
/// 32 MiB WRITE and stay connected leave lsmd's resident memory near where it was.
#[test]
fn connections_do_not_keep_their_largest_request_buffer() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let d = start(t, &[]);
    let before = vm_rss_kib(d.pid());
    let payload = vec![0x3cu8; 32 << 20];
    let mut clients = Vec::new();
    for _ in 0..16 {
        let mut c = RawClient::connect(&d.socket).expect("connect");
        assert_eq!(c.write(0, &payload).expect("write"), 0);
        clients.push(c);
    }
    let after = vm_rss_kib(d.pid());
    eprintln!("lsmd RSS {before} KiB before, {after} KiB after 16 × 32 MiB writes");
    assert!(
        after < before + 128 * 1024,
        "16 idle connections hold {} MiB after one 32 MiB write each",
        (after.saturating_sub(before)) / 1024
    );
    for c in &mut clients {
        assert_eq!(
            c.read(0, 4096).expect("read").as_deref(),
            Ok(&payload[..4096])
        );
    }
}

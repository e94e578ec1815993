//! lsmd's NBD frontend against real clients it did not write: qemu-io, qemu-img, nbdinfo and
//! nbdcopy (libnbd), over a Unix socket and TCP; a misbehaving raw client must not disturb them;
//! SIGTERM flushes the upper layer.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lsm_e2e::nbd::*;
use lsm_e2e::*;

fn start(config: &Path, sock: &Path, port: u16) -> Lsmd {
    let tcp = format!("127.0.0.1:{port}");
    let d = Lsmd::start(
        sock,
        &[
            OsStr::new("--config"),
            config.as_os_str(),
            OsStr::new("--tcp"),
            OsStr::new(&tcp),
        ],
    );
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    d
}

fn setup(t: &Path) -> (PathBuf, PathBuf) {
    // Data in the first 4 MiB of a 64 MiB disk; the rest is hole.
    let mut data = vec![0u8; 64 << 20];
    for (i, b) in data.iter_mut().enumerate().take(4 << 20) {
        *b = (i / 4096) as u8 ^ (i % 13) as u8;
    }
    image_from_bytes(t, &data, &[])
}

#[test]
fn real_clients_read_write_compare_and_map() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let (img, raw) = setup(t);
    let sock = t.join("lsmd.sock");
    let port = free_port();
    let d = start(&img, &sock, port);
    let unix = d.uri();
    let tcp = format!("nbd://127.0.0.1:{port}");

    // Write patterns over both transports, read them back, mirror them into the reference.
    ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0xab 10M 1M",
        "-c",
        "read -P 0xab 10M 1M",
        &unix,
    ]));
    ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0xcd 1000 5000",
        "-c",
        "read -P 0xcd 1000 5000",
        &tcp,
    ]));
    ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -z 2M 64k",
        "-c",
        "read -P 0 2M 64k",
        &unix,
    ]));
    let mut reference = std::fs::read(&raw).expect("read");
    reference[10 << 20..11 << 20].fill(0xab);
    reference[1000..6000].fill(0xcd);
    reference[2 << 20..(2 << 20) + 65536].fill(0);
    std::fs::write(&raw, &reference).expect("write");

    // Whole-disk compare with qemu-img, and a copy with nbdcopy.
    ok(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&raw)
        .arg(&unix));
    let copy = t.join("copy.raw");
    ok(Command::new("nbdcopy").arg(&tcp).arg(&copy));
    assert_eq!(sha256_file(&copy), sha256_file(&raw));

    // The map shows holes past the data.
    let map = ok(Command::new("nbdinfo").arg("--map").arg(&unix));
    assert!(map.contains("hole,zero") && map.contains("data"), "{map}");
    let list = ok(Command::new("nbdinfo").arg("--list").arg(&unix));
    assert!(list.contains("img"), "{list}");
    drop(d);
}

#[test]
fn misbehaving_clients_get_spec_errors_others_keep_working_and_sigterm_flushes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let (img, raw) = setup(t);
    let reference = std::fs::read(&raw).expect("read");
    let sock = t.join("lsmd.sock");
    let d = start(&img, &sock, free_port());
    let unix = d.uri();
    // A well-behaved client connected throughout: it must be served after every abuse below.
    let mut bystander = RawClient::connect(&sock).expect("connect");
    let mut check_bystander = |what: &str| {
        let got = bystander.read(4096 * 7, 8192).expect(what);
        assert_eq!(
            got.as_deref(),
            Ok(&reference[4096 * 7..4096 * 9]),
            "after {what}"
        );
    };

    // Garbage instead of a handshake; a client that leaves mid-handshake.
    for garbage in [&b"GET / HTTP/1.1\r\n\r\n"[..], b"\x00\x00\x00\x03"] {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).expect("hello");
        assert_eq!(&hello[..8], b"NBDMAGIC");
        let _ = s.write_all(garbage);
    }
    check_bystander("garbage handshakes");

    // Errors the connection survives: a read past the end (EINVAL), a write past the end
    // (ENOSPC), an unknown command (EINVAL), a read longer than the advertised maximum
    // block size (EOVERFLOW or EINVAL).
    let mut c = RawClient::connect(&sock).expect("connect");
    assert_eq!(c.size, 64 << 20);
    assert_eq!(c.read(64 << 20, 4096).expect("reply"), Err(22));
    assert_eq!(c.read((64 << 20) - 4096, 8192).expect("reply"), Err(22));
    assert_eq!(c.write((64 << 20) - 10, &[1; 20]).expect("reply"), 28);
    c.send(42, 7, 0, 0, &[]).expect("send");
    assert_eq!(c.reply().expect("reply"), (22, 7));
    let big = c.read(0, 64 << 20).expect("reply");
    assert!(matches!(big, Err(75) | Err(22)), "{big:?}");
    assert_eq!(
        c.read(0, 4096).expect("reply").as_deref(),
        Ok(&reference[..4096]),
        "the connection works after the errors"
    );
    check_bystander("error replies");

    // Violations that end the connection: a write longer than the maximum payload, a bad
    // request magic, a client gone mid-request (header and half the payload).
    let mut c = RawClient::connect(&sock).expect("connect");
    c.send(CMD_WRITE, 1, 0, 64 << 20, &[]).expect("send");
    let mut rest = Vec::new();
    let _ = c.stream.read_to_end(&mut rest); // dropped by the server
    let mut c = RawClient::connect(&sock).expect("connect");
    c.stream.write_all(&[0xff; 28]).expect("bad request");
    let _ = c.stream.read_to_end(&mut rest);
    let mut c = RawClient::connect(&sock).expect("connect");
    c.send(CMD_WRITE, 1, 0, 1 << 20, &vec![0xee; 300_000])
        .expect("send");
    drop(c);
    check_bystander("dropped connections");
    // The half-sent write was never applied.
    assert_eq!(
        bystander.read(0, 4096).expect("read").as_deref(),
        Ok(&reference[..4096])
    );
    bystander.send(CMD_DISC, 0, 0, 0, &[]).expect("disc");

    // A real client still works; reads past the end get an error there too.
    let o = run(Command::new("qemu-io").args(["-f", "raw", "-c", "read 64M 4k", &unix]));
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        text.contains("rror") || text.contains("Input/output") || text.contains("Invalid"),
        "{text}"
    );
    ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x5a 0 8k", &unix]));

    // SIGTERM: the daemon flushes and exits 0; the write is in the upper layer.
    let log = d.log();
    assert!(d.terminate().success(), "lsmd failed at SIGTERM: {log}");
    let out = t.join("after.raw");
    ok(lsmctl(["export", "-q"]).arg(&img).arg("-o").arg(&out));
    let data = std::fs::read(&out).expect("read");
    assert!(data[..8192].iter().all(|&b| b == 0x5a));
}

#[test]
fn several_exports_startup_errors_and_a_corrupt_chunk() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let (da, db) = (t.join("a"), t.join("b"));
    std::fs::create_dir_all(&da).expect("mkdir");
    std::fs::create_dir_all(&db).expect("mkdir");
    let (img_a, raw_a) = setup(&da);
    // b: 0x3c everywhere but the first 8 bytes of each block (so chunks differ and compress
    // to a few hundred bytes: byte 100 of the blob lies in the first chunk).
    let mut data_b = vec![0x3cu8; 8 << 20];
    for (i, blk) in data_b.chunks_mut(4096).enumerate() {
        blk[..8].copy_from_slice(&(i as u64 * 0x9e37_79b9_7f4a_7c15).to_le_bytes());
    }
    let (img_b, _) = image_from_bytes(&db, &data_b, &[]);
    let sock = t.join("lsmd.sock");

    // Bad configs: lsmd exits non-zero with a message naming the problem.
    let lsmd_fails = |args: &[&OsStr], needle: &str| {
        let o = run(Command::new(bin("lsmd"))
            .arg("serve")
            .args(args)
            .arg("--socket")
            .arg(t.join("never.sock")));
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(
            !o.status.success() && err.contains(needle),
            "{needle}: {err}"
        );
    };
    lsmd_fails(
        &[OsStr::new("--config"), t.join("missing.json").as_os_str()],
        "missing.json",
    );
    std::fs::write(t.join("bad.json"), "{\"size\": ").expect("write");
    lsmd_fails(
        &[OsStr::new("--config"), t.join("bad.json").as_os_str()],
        "bad.json",
    );
    let cfg = std::fs::read_to_string(&img_a).expect("read config");
    let gone = cfg.replace("base.blob", "gone.blob");
    std::fs::write(da.join("gone.json"), gone).expect("write");
    lsmd_fails(
        &[OsStr::new("--config"), da.join("gone.json").as_os_str()],
        "gone.blob",
    );
    let twice = [OsStr::new("--config"), img_a.as_os_str()];
    lsmd_fails(
        &[twice[0], twice[1], twice[0], twice[1]],
        "two exports are named",
    );

    // A corrupt chunk in b's blob: reads of it fail with EIO naming the layer in the log,
    // other reads and the other export keep working.
    let blob_b = db.join("base.blob");
    let mut bytes = std::fs::read(&blob_b).expect("read blob");
    bytes[100] ^= 0x40; // inside the first chunk
    std::fs::write(&blob_b, &bytes).expect("write blob");

    let a = format!("a={}", img_a.display());
    let b = format!("b={}", img_b.display());
    let d = Lsmd::start(
        &sock,
        &[
            OsStr::new("--config"),
            OsStr::new(&a),
            OsStr::new("--config"),
            OsStr::new(&b),
        ],
    );
    let list = ok(Command::new("nbdinfo").arg("--list").arg(d.uri()));
    assert!(
        list.contains("export=\"a\"") || list.contains("a\n"),
        "{list}"
    );
    assert!(list.contains('b'), "{list}");
    // The default export is the first; named exports are reached by name.
    ok(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&raw_a)
        .arg(d.uri()));
    let uri_b = format!("nbd+unix:///b?socket={}", sock.display());
    let o = run(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x3c 8 4000", &uri_b]));
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(text.contains("Input/output error"), "{text}");
    assert!(
        d.log().contains("base.blob") && d.log().contains("corrupt"),
        "{}",
        d.log()
    );
    ok(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x3c 4194312 4000", &uri_b]));
}

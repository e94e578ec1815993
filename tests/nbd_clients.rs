//! lsmd's NBD frontend against real clients it did not write: qemu-io, qemu-img, nbdinfo and
//! nbdcopy (libnbd), over a Unix socket and TCP; a misbehaving raw client must not disturb them;
//! SIGTERM flushes the upper layer.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use lsm_e2e::*;

struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

fn start(config: &Path, sock: &Path, port: u16) -> Daemon {
    let child = Command::new(bin("lsmd"))
        .args(["serve", "--config"])
        .arg(config)
        .arg("--socket")
        .arg(sock)
        .arg("--tcp")
        .arg(format!("127.0.0.1:{port}"))
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn lsmd");
    for _ in 0..100 {
        if sock.exists() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Daemon(child)
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
    let unix = format!("nbd+unix:///?socket={}", sock.display());
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
fn misbehaving_clients_do_not_disturb_others_and_sigterm_flushes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let (img, _) = setup(t);
    let sock = t.join("lsmd.sock");
    let port = free_port();
    let mut d = start(&img, &sock, port);
    let unix = format!("nbd+unix:///?socket={}", sock.display());

    // Garbage instead of a handshake; a client that leaves mid-handshake; a bad request magic
    // after a valid EXPORT_NAME.
    for garbage in [&b"GET / HTTP/1.1\r\n\r\n"[..], b"\x00\x00\x00\x03"] {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).expect("hello");
        assert_eq!(&hello[..8], b"NBDMAGIC");
        let _ = s.write_all(garbage);
    }
    {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).expect("hello");
        let mut m = vec![0, 0, 0, 3];
        m.extend_from_slice(b"IHAVEOPT");
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&0u32.to_be_bytes());
        s.write_all(&m).expect("export name");
        let mut info = [0u8; 10];
        s.read_exact(&mut info).expect("export info");
        s.write_all(&[0xff; 28]).expect("bad request");
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest); // the server drops the connection
    }
    // Reads past the end get an error, the connection survives; then a write to flush at exit.
    let o = run(Command::new("qemu-io").args(["-f", "raw", "-c", "read 64M 4k", &unix]));
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        text.contains("rror") || text.contains("Input/output") || text.contains("Invalid"),
        "{text}"
    );
    ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x5a 0 8k", &unix]));

    // SIGTERM: the daemon flushes and exits 0; the write is in the upper layer.
    ok(Command::new("kill").args(["-TERM", &d.0.id().to_string()]));
    let status = d.0.wait().expect("wait");
    assert!(status.success(), "lsmd exited with {status}");
    let out = t.join("after.raw");
    ok(lsmctl(["export", "-q"]).arg(&img).arg("-o").arg(&out));
    let data = std::fs::read(&out).expect("read");
    assert!(data[..8192].iter().all(|&b| b == 0x5a));
}

//! NBD over TCP is safe by default: plain text on a non-loopback address is refused unless
//! asked for (`--insecure-tcp`), writable exposed exports are warned about, and with
//! `--tls-cert/--tls-key` clients must STARTTLS — interoperating with qemu's
//! `tls-creds-x509` and libnbd's `nbds://` (certificates made here with openssl).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lsm_e2e::nbd::*;
use lsm_e2e::*;

/// A 64 MiB disk with data in its first 4 MiB; (config, raw reference).
fn image(t: &Path) -> (PathBuf, PathBuf) {
    let mut data = vec![0u8; 64 << 20];
    for (i, b) in data.iter_mut().enumerate().take(4 << 20) {
        *b = (i / 4096) as u8 ^ (i % 13) as u8;
    }
    image_from_bytes(t, &data, &[])
}

/// `lsmd serve` that is expected to exit at once: (success, stderr). Killed (and reported as
/// still running) if it serves instead.
fn serve_briefly(args: &[&OsStr]) -> (bool, String) {
    let mut child = Command::new(bin("lsmd"))
        .arg("serve")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("lsmd");
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if let Ok(Some(_)) = child.try_wait() {
            let o = child.wait_with_output().expect("output");
            return (
                o.status.success(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let o = child.wait_with_output().expect("output");
    (
        false,
        format!(
            "still serving after 20 s: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

fn wait_tcp(port: u16) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("nothing listens on port {port}");
}

#[test]
fn plain_tcp_on_a_non_loopback_address_needs_insecure_tcp_and_warns() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let (img, _) = image(t);
    let any = format!("0.0.0.0:{}", free_port());
    let (ok_, err) = serve_briefly(&[
        OsStr::new("--config"),
        img.as_os_str(),
        OsStr::new("--tcp"),
        OsStr::new(&any),
    ]);
    assert!(
        !ok_ && err.contains("--insecure-tcp") && err.contains("--tls-cert"),
        "plain NBD on 0.0.0.0 was not refused: {err}"
    );

    // Asked for: served, with a warning about plain text and one about writable exports.
    let port = free_port();
    let any = format!("0.0.0.0:{port}");
    let d = Lsmd::start(
        &t.join("w.sock"),
        &[
            OsStr::new("--config"),
            img.as_os_str(),
            OsStr::new("--tcp"),
            OsStr::new(&any),
            OsStr::new("--insecure-tcp"),
        ],
    );
    wait_tcp(port);
    ok(Command::new("nbdinfo").arg(format!("nbd://127.0.0.1:{port}/")));
    let log = d.log();
    assert!(
        log.contains("plain text") && log.contains("writable"),
        "{log}"
    );
    drop(d);

    // Read-only: the plain-text warning stays, the writable one goes. Loopback: neither.
    let port = free_port();
    let any = format!("0.0.0.0:{port}");
    let d = Lsmd::start(
        &t.join("r.sock"),
        &[
            OsStr::new("--config"),
            img.as_os_str(),
            OsStr::new("--tcp"),
            OsStr::new(&any),
            OsStr::new("--insecure-tcp"),
            OsStr::new("--read-only"),
        ],
    );
    wait_tcp(port);
    let log = d.log();
    assert!(
        log.contains("plain text") && !log.contains("writable"),
        "{log}"
    );
    drop(d);
    let port = free_port();
    let lo = format!("127.0.0.1:{port}");
    let d = Lsmd::start(
        &t.join("l.sock"),
        &[
            OsStr::new("--config"),
            img.as_os_str(),
            OsStr::new("--tcp"),
            OsStr::new(&lo),
        ],
    );
    wait_tcp(port);
    let log = d.log();
    assert!(
        !log.contains("plain text") && !log.contains("writable"),
        "{log}"
    );
}

/// A CA, and a server certificate for localhost/127.0.0.1 that it signed, in `dir`; a client
/// directory (`dir/client`, the layout qemu and libnbd read: `ca-cert.pem`).
/// lsmd serving `img` over TCP on `addr`'s host and a free port, with the server certificate
/// and key `make_certs` wrote under `certs`, plus `extra` arguments; returns once the port
/// listens.
fn serve_tls(t: &Path, addr: &str, img: &Path, certs: &Path, extra: &[&OsStr]) -> (Lsmd, u16) {
    let port = free_port();
    let listen = format!("{addr}:{port}");
    let (cert, key) = (certs.join("server-cert.pem"), certs.join("server-key.pem"));
    let mut args = vec![
        OsStr::new("--config"),
        img.as_os_str(),
        OsStr::new("--tcp"),
        OsStr::new(&listen),
        OsStr::new("--tls-cert"),
        cert.as_os_str(),
        OsStr::new("--tls-key"),
        key.as_os_str(),
    ];
    args.extend_from_slice(extra);
    let d = Lsmd::start(&t.join(format!("lsmd-{port}.sock")), &args);
    wait_tcp(port);
    (d, port)
}

fn make_certs(dir: &Path, ca_name: &str) -> PathBuf {
    std::fs::create_dir_all(dir.join("client")).expect("mkdir");
    let ext = dir.join("ext.cnf");
    std::fs::write(
        &ext,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    let ssl = |args: &[&str]| {
        ok(Command::new("openssl").current_dir(dir).args(args));
    };
    ssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
        "-days",
        "2",
        "-subj",
        &format!("/CN={ca_name}"),
    ]);
    ssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server-key.pem",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    ssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca-cert.pem",
        "-CAkey",
        "ca-key.pem",
        "-CAcreateserial",
        "-out",
        "server-cert.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    std::fs::copy(dir.join("ca-cert.pem"), dir.join("client/ca-cert.pem")).expect("copy");
    dir.join("client")
}

#[test]
fn starttls_with_qemu_and_libnbd_clients() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let (img, raw) = image(t);
    let certs = t.join("pki");
    let client = make_certs(&certs, "lsm-test-ca");
    // A second CA the server's certificate does not chain to.
    let other = make_certs(&t.join("other-pki"), "other-ca");

    // TLS makes a non-loopback address acceptable without --insecure-tcp.
    let (_d, port) = serve_tls(t, "0.0.0.0", &img, &certs, &[]);
    let nbds = format!(
        "nbds://localhost:{port}/?tls-certificates={}",
        client.display()
    );

    // libnbd: the handshake is over TLS, a copy of the disk is byte-exact.
    let info = ok(Command::new("nbdinfo").arg(&nbds));
    assert!(info.contains("with TLS"), "{info}");
    let copy = t.join("copy.raw");
    ok(Command::new("nbdcopy").arg(&nbds).arg(&copy));
    assert_eq!(sha256_file(&copy), sha256_file(&raw));

    // qemu: write and read back through tls-creds-x509.
    let creds = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        client.display()
    );
    let opts = format!("driver=nbd,host=localhost,port={port},tls-creds=tls0");
    ok(Command::new("qemu-io").args([
        "--object",
        &creds,
        "--image-opts",
        &opts,
        "-c",
        "write -P 0x6c 20M 1M",
        "-c",
        "read -P 0x6c 20M 1M",
        "-c",
        "read -P 0 30M 1M",
    ]));
    ok(Command::new("qemu-img").args(["info", "--object", &creds, "--image-opts", &opts]));

    // Refused: a plain-text client (the server requires TLS), and a client that does not trust
    // the server's certificate.
    let o = run(Command::new("nbdinfo").arg(format!("nbd://localhost:{port}/")));
    assert!(!o.status.success(), "a plain-text client was served");
    let o = run(Command::new("nbdinfo").arg(format!(
        "nbds://localhost:{port}/?tls-certificates={}",
        other.display()
    )));
    assert!(!o.status.success(), "a client with another CA was served");
    // And the daemon still serves TLS clients after those.
    ok(Command::new("nbdinfo").arg(&nbds));

    // --tls-client-ca: only clients with a certificate from that CA are served.
    let with_cert = certs.join("with-cert");
    std::fs::create_dir_all(&with_cert).expect("mkdir");
    std::fs::write(certs.join("cext.cnf"), "extendedKeyUsage=clientAuth\n").expect("ext");
    for args in [
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "with-cert/client-key.pem",
            "-out",
            "client.csr",
            "-subj",
            "/CN=lsm-client",
        ][..],
        &[
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            "with-cert/client-cert.pem",
            "-days",
            "2",
            "-extfile",
            "cext.cnf",
        ],
    ] {
        ok(Command::new("openssl").current_dir(&certs).args(args));
    }
    std::fs::copy(certs.join("ca-cert.pem"), with_cert.join("ca-cert.pem")).expect("copy");
    let ca = certs.join("ca-cert.pem");
    let (_m, port) = serve_tls(
        t,
        "127.0.0.1",
        &img,
        &certs,
        &[
            OsStr::new("--read-only"),
            OsStr::new("--tls-client-ca"),
            ca.as_os_str(),
        ],
    );
    let uri = |dir: &Path| {
        format!(
            "nbds://localhost:{port}/?tls-certificates={}",
            dir.display()
        )
    };
    let o = run(Command::new("nbdinfo").arg(uri(&client)));
    assert!(
        !o.status.success(),
        "a client without a certificate was served"
    );
    let info = ok(Command::new("nbdinfo").arg(uri(&with_cert)));
    assert!(info.contains("with TLS"), "{info}");
}

/// A raw TLS client (python's ssl) that negotiates STARTTLS, asks for 64 reads of 32 MiB and
/// never reads the replies: qemu-io over TLS is still served, and the client is dropped after the
/// write timeout.
const STUCK_TLS_CLIENT: &str = r#"
import socket, ssl, struct, sys, time
port, ca = int(sys.argv[1]), sys.argv[2]
s = socket.create_connection(("127.0.0.1", port))
def exact(sock, n):
    b = b""
    while len(b) < n:
        c = sock.recv(n - len(b))
        if not c: raise SystemExit("closed")
        b += c
    return b
exact(s, 18)
s.sendall(struct.pack(">I", 3) + b"IHAVEOPT" + struct.pack(">II", 5, 0))
exact(s, 20)
ctx = ssl.create_default_context(cafile=ca)
t = ctx.wrap_socket(s, server_hostname="localhost")
t.sendall(b"IHAVEOPT" + struct.pack(">II", 1, 0))
exact(t, 10)
for i in range(64):
    t.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, 0, 32 << 20))
print("stuck", flush=True)
time.sleep(600)
"#;

#[test]
fn a_tls_client_that_stops_reading_stalls_no_one() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let (img, _) = image(t);
    let certs = t.join("pki");
    let client = make_certs(&certs, "lsm-test-ca");
    let (d, port) = serve_tls(
        t,
        "127.0.0.1",
        &img,
        &certs,
        &[
            OsStr::new("--workers"),
            OsStr::new("2"),
            OsStr::new("--write-timeout"),
            OsStr::new("20"),
        ],
    );
    let mut stuck = Command::new("python3")
        .args(["-c", STUCK_TLS_CLIENT, &port.to_string()])
        .arg(client.join("ca-cert.pem"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(stuck.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("stuck client");
    assert_eq!(line.trim(), "stuck");
    std::thread::sleep(Duration::from_secs(1));

    let creds = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        client.display()
    );
    let opts = format!("driver=nbd,host=localhost,port={port},tls-creds=tls0");
    let mut qemu = Command::new("qemu-io")
        .args(["--object", &creds, "--image-opts", &opts, "-r"])
        .args(["-c", "read -P 0 8M 1M"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-io");
    let start = Instant::now();
    let status = loop {
        if let Ok(Some(st)) = qemu.try_wait() {
            break st;
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = qemu.kill();
            let _ = stuck.kill();
            panic!("qemu-io was not served within 10 s while a TLS client was stuck");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "qemu-io: {status}");
    let start = Instant::now();
    while !d.log().contains("dropping the connection") {
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "the stuck TLS client was never dropped: {}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = stuck.kill();
    let _ = stuck.wait();
}

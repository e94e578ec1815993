//! One writer per upper layer, across processes (README "Guarantees"): while `lsmd serve`
//! serves an image writably, `lsmctl write`, `lsmctl commit` and a second `lsmd serve` fail
//! with an error naming the holder, and nothing they could have written is there; read-only
//! users (`lsmctl export`, `lsmd serve --read-only`) work beside it and change no byte of the
//! upper layer. When the writer is killed (-9), the next one takes over at once.

use std::ffi::OsStr;
use std::path::Path;

use lsm_e2e::nbd::*;
use lsm_e2e::*;

fn upper_files(dir: &Path) -> Vec<(String, String)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .expect("upper dir")
        .map(|e| {
            let p = e.expect("entry").path();
            (
                p.file_name().expect("name").to_string_lossy().into_owned(),
                sha256_file(&p),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_served_upper_layer_has_one_writer() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let (img, _) = image_from_bytes(t, &vec![7u8; 4 << 20], &[]);
    let upper = t.join("img.upper");
    let lsmd = Lsmd::start(
        &t.join("a.sock"),
        &[OsStr::new("--config"), img.as_os_str()],
    );
    // Something in the upper layer, flushed.
    let mut c = RawClient::connect(&lsmd.socket).expect("connect");
    c.write(0, &[1u8; 4096]).expect("write");
    assert_eq!(c.flush().expect("flush"), 0);
    drop(c);
    let before = upper_files(&upper);
    let pid = lsmd.pid();

    let new = t.join("new.raw");
    std::fs::write(&new, vec![9u8; 4 << 20]).expect("raw");
    for (what, out) in [
        (
            "lsmctl write",
            run(lsmctl(["write"]).arg(&img).arg("--from").arg(&new)),
        ),
        (
            "lsmctl commit",
            run(lsmctl(["commit"]).arg(&img).arg("-o").arg(t.join("c.blob"))),
        ),
    ] {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what} succeeded on a served image");
        assert!(
            err.contains("in use by") && err.contains(&format!("pid {pid}")),
            "{what} does not name the holder: {err}"
        );
    }
    assert!(!t.join("c.blob").exists(), "a refused commit left a blob");
    // A second daemon on the same image.
    let out = run(std::process::Command::new(bin("lsmd"))
        .args(["serve", "--config"])
        .arg(&img)
        .arg("--socket")
        .arg(t.join("b.sock")));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(&format!("pid {pid}")),
        "second lsmd: {err}"
    );
    // Readers work beside the writer and change nothing.
    ok(lsmctl(["export", "-q"])
        .arg(&img)
        .arg("-o")
        .arg(t.join("out.raw")));
    let head = std::fs::read(t.join("out.raw")).expect("export");
    assert_eq!(head[..4096], [1u8; 4096], "export sees the flushed write");
    let ro = Lsmd::start(
        &t.join("ro.sock"),
        &[
            OsStr::new("--config"),
            img.as_os_str(),
            OsStr::new("--read-only"),
        ],
    );
    drop(ro);
    assert_eq!(
        upper_files(&upper),
        before,
        "readers changed the upper layer"
    );

    // kill -9: the lock goes with the process; the next writer opens at once.
    lsmd.kill9();
    ok(lsmctl(["write"]).arg(&img).arg("--from").arg(&new));
}

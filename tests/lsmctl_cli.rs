//! `lsmctl` as a person meets it: `--help` everywhere, clear errors for bad input, and
//! corruption reported with the layer and offset.

use std::process::Command;

use lsm_e2e::*;

fn small_image(dir: &std::path::Path) -> std::path::PathBuf {
    let mut data = vec![0u8; 8 << 20];
    for (i, b) in data.iter_mut().enumerate().take(5 << 20) {
        *b = (i % 253) as u8 ^ (i >> 12) as u8;
    }
    image_from_bytes(dir, &data, &["--chunk-size", "16K"]).0
}

#[test]
fn every_subcommand_has_help() {
    for sub in [
        "create", "import", "write", "export", "commit", "inspect", "verify",
    ] {
        let out = ok(&mut lsmctl([sub, "--help"]));
        assert!(out.contains("Usage: lsmctl"), "{sub} --help: {out}");
    }
}

#[test]
fn bad_input_gets_a_clear_error_and_no_panic() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    std::fs::write(t.join("junk.blob"), vec![7u8; 5000]).expect("write");
    std::fs::write(t.join("bad.json"), r#"{"size": 10, "layerz": []}"#).expect("write");
    let p = |name: &str| t.join(name).into_os_string();
    let s = |x: &str| std::ffi::OsString::from(x);
    let cases: Vec<(Vec<std::ffi::OsString>, &str)> = vec![
        (vec![s("inspect"), p("junk.blob")], "bad magic"),
        (vec![s("inspect"), p("missing.blob")], "missing.blob"),
        (vec![s("export"), p("bad.json"), s("-o"), p("x")], "layerz"),
        (
            vec![s("create"), s("--size"), s("12Q"), p("n.json")],
            "suffix",
        ),
        (
            vec![
                s("import"),
                s("--chunk-size"),
                s("1000"),
                p("junk.blob"),
                s("-o"),
                p("o.blob"),
            ],
            "power of two",
        ),
    ];
    for (args, want) in cases {
        let mut c: Command = lsmctl(args);
        let o = run(&mut c);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{c:?} succeeded");
        assert!(err.contains(want), "{c:?}: stderr lacks {want:?}: {err}");
        assert!(!err.contains("panicked"), "{c:?} panicked: {err}");
    }
    assert!(
        !t.join("o.blob").exists() && !t.join("o.partial").exists(),
        "no partial output"
    );
}

#[test]
fn corruption_is_reported_with_layer_and_offset() {
    let tmp = tempfile::tempdir().expect("tmp");
    let img = small_image(tmp.path());
    ok(lsmctl(["verify"]).arg(&img));
    let blob = tmp.path().join("base.blob");
    let good = std::fs::read(&blob).expect("read");
    for pos in [10usize, 5000, 200_000, good.len() - 200, good.len() - 5] {
        let mut bad = good.clone();
        bad[pos] ^= 0x10;
        std::fs::write(&blob, &bad).expect("write");
        let o = run(lsmctl(["verify"]).arg(&img));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(!o.status.success(), "verify passed with a flip at {pos}");
        assert!(
            text.contains("base.blob") && text.contains("offset"),
            "flip at {pos}: {text}"
        );
        // Reading the whole image must fail too, except for the header, which no read uses.
        let o = run(lsmctl(["export", "-q"])
            .arg(&img)
            .arg("-o")
            .arg(tmp.path().join("out.raw")));
        assert!(
            !o.status.success() || pos < 64,
            "export succeeded with a flip at {pos}"
        );
    }
    std::fs::write(&blob, &good).expect("restore");
    ok(lsmctl(["verify", "--json"]).arg(&img));
}

#[test]
fn inspect_reports_structure() {
    let tmp = tempfile::tempdir().expect("tmp");
    let img = small_image(tmp.path());
    let v: serde_json::Value =
        serde_json::from_str(&ok(lsmctl(["inspect", "--json"]).arg(&img))).expect("json");
    let l = &v[0];
    assert_eq!(l["chunk_size"], 16384);
    assert_eq!(l["data_bytes"], 5 << 20);
    assert!(l["compression_ratio"].as_f64().is_some_and(|r| r > 1.0));
    let human = ok(lsmctl(["inspect"]).arg(tmp.path().join("base.blob")));
    assert!(human.contains("compression ratio"));
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let tmp = tempfile::tempdir().expect("tmp");
    let img = small_image(tmp.path());
    let o = run(std::process::Command::new("sh").arg("-c").arg(format!(
        "'{}' inspect --extents '{}' | true",
        bin("lsmctl").display(),
        img.display()
    )));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
}

/// `lsmctl detach` signals only the lsmd its record describes: a record whose pid is an
/// unrelated process (a recycled pid, a hand-edited file) or the process group (pid 0) is
/// refused with the reason, and nothing is signalled.
#[test]
fn detach_never_signals_a_process_that_is_not_its_lsmd() {
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().expect("tmp");
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).expect("mkdir");
    let mut sleeper = Command::new("sleep").arg("600").spawn().expect("sleep");
    let write_record = |name: &str, pid: u32| {
        let rec = serde_json::json!({
            "name": name, "image": tmp.path().join(format!("{name}.json")), "kind": "fuse",
            "device": tmp.path().join(name), "pid": pid, "log": tmp.path().join("log"),
        });
        std::fs::write(state.join(format!("attach-{name}.json")), rec.to_string()).expect("record");
    };
    write_record("recycled", sleeper.id());
    write_record("group", 0);
    for (name, pid) in [("recycled", sleeper.id()), ("group", 0)] {
        // Its own process group: were pid 0 signalled, only lsmctl itself would be hit.
        let o = run(lsmctl(["detach", name, "--state-dir"])
            .arg(&state)
            .process_group(0));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "detach {name} succeeded: {err}");
        assert!(
            err.contains("refusing to signal") && err.contains(&format!("pid {pid}")),
            "detach {name}: {err}"
        );
        assert!(
            state.join(format!("attach-{name}.json")).exists(),
            "the record of {name} was removed"
        );
    }
    let err = String::from_utf8_lossy(
        &run(lsmctl(["detach", "recycled", "--state-dir"]).arg(&state)).stderr,
    )
    .into_owned();
    assert!(err.contains("not lsmd"), "{err}");
    assert!(
        matches!(sleeper.try_wait(), Ok(None)),
        "the unrelated process was signalled"
    );
    let list = ok(lsmctl(["list", "--state-dir"]).arg(&state));
    assert!(
        list.contains("lsmd gone") && !list.contains("running"),
        "{list}"
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

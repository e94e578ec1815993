//! `kernel-setup/install-snapshotter` and `kernel-setup/check` against containerd's own full
//! default config (`containerd config default`) and a real containerd started on the result:
//! the installer adds the proxy snapshotter (and with `--cri` makes it the CRI plugin's, with
//! the layer annotations forwarded), is idempotent, leaves a config it cannot parse untouched,
//! and `check` reports containerd configured only once the snapshotter listens.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use lsm_e2e::*;

fn script(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../kernel-setup")
        .join(name)
}

fn install(config: &Path, socket: &Path, prefix: &Path) -> std::process::Output {
    run(Command::new("bash")
        .arg(script("install-snapshotter"))
        .arg("--cri")
        .arg("--config")
        .arg(config)
        .arg("--socket")
        .arg(socket)
        .arg("--prefix")
        .arg(prefix)
        .arg("--from")
        .arg(target_dir())
        .args(["--no-systemd", "--no-restart"]))
}

fn check_json(config: &Path) -> serde_json::Value {
    let o = run(Command::new("bash")
        .arg(script("check"))
        .arg("--json")
        .arg("--containerd-config")
        .arg(config));
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("check --json: {e}: {}", String::from_utf8_lossy(&o.stdout)))
}

#[test]
fn installer_configures_a_real_containerd_and_check_reports_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    // containerd's complete default config, moved into the test's own root, state and socket.
    let default = ok(Command::new("containerd").args(["config", "default"]));
    let config = t.join("config.toml");
    std::fs::write(
        &config,
        default
            .replace("/var/lib/containerd", &t.join("root").display().to_string())
            .replace("/run/containerd", &t.join("state").display().to_string()),
    )
    .expect("write config");
    let socket = t.join("lsm.sock");
    let prefix = t.join("prefix");

    let o = install(&config, &socket, &prefix);
    assert!(
        o.status.success(),
        "install: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    for b in ["lsm-snapshotter", "lsmd", "lsmctl"] {
        assert!(prefix.join("bin").join(b).exists(), "{b} installed");
    }
    assert!(t.join("config.toml.lsm-backup").exists(), "old config kept");
    let j = check_json(&config);
    let c = &j["containerd"];
    assert_eq!(c["proxy"], socket.display().to_string(), "{j}");
    assert_eq!(c["cri_snapshotter"], "lsm", "{j}");
    assert_eq!(c["cri_annotations"], "forwarded", "{j}");
    assert_eq!(c["ready"], false, "nothing listens yet: {j}");

    // Idempotent: a second run changes nothing.
    let before = std::fs::read(&config).expect("config");
    let o = install(&config, &socket, &prefix);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("already configured"));
    assert_eq!(before, std::fs::read(&config).expect("config"));

    // The snapshotter listens: check says ready, and containerd loads the config it was given
    // and reports the proxy snapshotter as a working plugin.
    let mut snap = Command::new(prefix.join("bin/lsm-snapshotter"))
        .arg("--socket")
        .arg(&socket)
        .arg("--root")
        .arg(t.join("lsm-root"))
        .stderr(Stdio::null())
        .spawn()
        .expect("start lsm-snapshotter");
    let mut containerd = Command::new("containerd")
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(t.join("containerd.log")).expect("log"))
        .spawn()
        .expect("start containerd");
    let address = t.join("state/containerd.sock");
    let mut plugins = String::new();
    for _ in 0..300 {
        let o = run(Command::new("ctr")
            .arg("--address")
            .arg(&address)
            .args(["plugins", "ls"]));
        if o.status.success() {
            plugins = String::from_utf8_lossy(&o.stdout).into_owned();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let j = check_json(&config);
    let _ = containerd.kill();
    let _ = containerd.wait();
    let _ = snap.kill();
    let _ = snap.wait();
    let lsm = plugins
        .lines()
        .find(|l| {
            l.contains("io.containerd.snapshotter.v1") && l.split_whitespace().nth(1) == Some("lsm")
        })
        .unwrap_or_else(|| {
            panic!(
                "containerd lists no lsm snapshotter:\n{plugins}\n{}",
                std::fs::read_to_string(t.join("containerd.log")).unwrap_or_default()
            )
        });
    assert!(lsm.trim_end().ends_with("ok"), "{lsm}");
    assert_eq!(j["containerd"]["ready"], true, "{j}");
}

#[test]
fn installer_leaves_a_config_it_cannot_parse_untouched() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let config = t.join("config.toml");
    let broken = "version = 2\n[plugins\nthis is not toml\n";
    std::fs::write(&config, broken).expect("write");
    let o = install(&config, &t.join("lsm.sock"), &t.join("prefix"));
    assert!(
        !o.status.success(),
        "a config that does not parse is refused"
    );
    assert_eq!(std::fs::read_to_string(&config).expect("config"), broken);
    assert!(!t.join("config.toml.lsm-backup").exists());
}

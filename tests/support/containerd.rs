//! A real containerd (Debian's 1.6) with runc, started by a test in its own root, state and
//! socket under a temporary directory, with `lsm-snapshotter` as its proxy snapshotter `lsm`.
//! The CRI plugin is disabled unless started with [`Containerd::start_cri`] (then its
//! snapshotter is `lsm` with layer annotations forwarded, as `kernel-setup/install-snapshotter
//! --cri` configures it). Both processes are killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::{bin, ok, run};

/// containerd namespace the tests use.
pub const NAMESPACE: &str = "lsmtest";

/// A running `lsm-snapshotter` + containerd pair.
pub struct Containerd {
    pub dir: PathBuf,
    /// containerd's gRPC socket.
    pub address: PathBuf,
    /// The snapshotter's socket and state directory.
    pub snap_socket: PathBuf,
    pub snap_root: PathBuf,
    containerd: Option<Child>,
    containerd_runs: usize,
    snapshotter: Option<Child>,
    snapshotter_runs: usize,
    /// Extra `lsm-snapshotter` arguments, on every (re)start.
    snapshotter_args: Vec<String>,
}

/// Waits until `path` exists (a socket being bound), or panics naming `what` and its log.
fn wait_for_socket(path: &Path, child: &mut Child, what: &str, log: &Path) {
    for _ in 0..300 {
        if path.exists() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited ({status}) before binding {}:\n{}",
                path.display(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "{what} did not bind {} within 30 s:\n{}",
        path.display(),
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

impl Containerd {
    /// Starts the snapshotter and containerd under `dir`.
    pub fn start(dir: &Path) -> Containerd {
        Containerd::start_with_env(dir, &[])
    }

    /// Starts the snapshotter (with extra environment variables) and containerd under `dir`.
    pub fn start_with_env(dir: &Path, snapshotter_env: &[(&str, &str)]) -> Containerd {
        Containerd::start_with(dir, snapshotter_env, &[])
    }

    /// Starts the snapshotter (with extra environment variables and arguments) and containerd.
    pub fn start_with(
        dir: &Path,
        snapshotter_env: &[(&str, &str)],
        snapshotter_args: &[&str],
    ) -> Containerd {
        Containerd::start_full(dir, snapshotter_env, snapshotter_args, None)
    }

    /// Starts them with the snapshotter reaching `plain_http_registry` (`host:port`, where
    /// converted images are) over plain HTTP.
    pub fn start_plain_http(dir: &Path, plain_http_registry: &str) -> Containerd {
        Containerd::start_with(dir, &[], &["--plain-http", plain_http_registry])
    }

    /// Starts them with containerd's CRI plugin on (its socket is containerd's), pulling into
    /// the `lsm` snapshotter with layer annotations forwarded (`disable_snapshot_annotations =
    /// false`), and reaching `plain_http_registry` (`host:port`) over plain HTTP; the
    /// snapshotter also reaches it over plain HTTP.
    pub fn start_cri(dir: &Path, plain_http_registry: &str) -> Containerd {
        Containerd::start_full(
            dir,
            &[],
            &["--plain-http", plain_http_registry],
            Some(plain_http_registry),
        )
    }

    fn start_full(
        dir: &Path,
        snapshotter_env: &[(&str, &str)],
        snapshotter_args: &[&str],
        cri_registry: Option<&str>,
    ) -> Containerd {
        let mut c = Containerd {
            dir: dir.to_path_buf(),
            address: dir.join("containerd.sock"),
            snap_socket: dir.join("lsm.sock"),
            snap_root: dir.join("lsm-root"),
            containerd: None,
            containerd_runs: 0,
            snapshotter: None,
            snapshotter_runs: 0,
            snapshotter_args: snapshotter_args.iter().map(|a| a.to_string()).collect(),
        };
        c.start_snapshotter(snapshotter_env);
        let config = dir.join("config.toml");
        let plugins = match cri_registry {
            None => "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n".to_string(),
            Some(reg) => format!(
                "[plugins.\"io.containerd.grpc.v1.cri\"]\n  disable_tcp_service = true\n\
                 [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"lsm\"\n\
                 \x20 disable_snapshot_annotations = false\n\
                 [plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = \"{cni}\"\n  conf_dir = \"{cni}\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"{reg}\"]\n\
                 \x20 endpoint = [\"http://{reg}\"]\n",
                cni = dir.join("cni").display(),
            ),
        };
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n{plugins}\
                 [grpc]\n  address = \"{sock}\"\n\
                 [ttrpc]\n  address = \"{sock}.ttrpc\"\n\
                 [proxy_plugins]\n  [proxy_plugins.lsm]\n    type = \"snapshot\"\n    address = \"{snap}\"\n",
                root = dir.join("containerd-root").display(),
                state = dir.join("containerd-state").display(),
                sock = c.address.display(),
                snap = c.snap_socket.display(),
            ),
        )
        .expect("write containerd config");
        c.start_containerd();
        c
    }

    /// (Re)starts containerd with the config written at start; returns once it answers.
    fn start_containerd(&mut self) {
        self.containerd_runs += 1;
        let log = self.dir.join(self.containerd_log(self.containerd_runs));
        let _ = std::fs::remove_file(&self.address);
        let mut child = Command::new("containerd")
            .arg("--config")
            .arg(self.dir.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("containerd log"))
            .spawn()
            .expect("start containerd (installed by tests/install-deps.sh)");
        wait_for_socket(&self.address, &mut child, "containerd", &log);
        self.containerd = Some(child);
        // The socket exists slightly before the API answers.
        for _ in 0..100 {
            if run(&mut self.ctr(["version"])).status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("containerd does not answer `ctr version`: {}", self.logs());
    }

    /// Kills containerd with SIGKILL and starts it again on the same root, state and config
    /// (running containers' shims live on, as on a real host).
    pub fn restart_containerd(&mut self) {
        if let Some(mut child) = self.containerd.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.start_containerd();
    }

    /// containerd's log of its `run`-th start.
    fn containerd_log(&self, run: usize) -> String {
        match run {
            1 => "containerd.log".to_string(),
            n => format!("containerd.{n}.log"),
        }
    }

    /// (Re)starts `lsm-snapshotter` with extra environment variables.
    pub fn start_snapshotter(&mut self, env: &[(&str, &str)]) {
        self.snapshotter_runs += 1;
        let log = self
            .dir
            .join(format!("snapshotter.{}.log", self.snapshotter_runs));
        let mut cmd = Command::new(bin("lsm-snapshotter"));
        cmd.arg("--socket")
            .arg(&self.snap_socket)
            .arg("--root")
            .arg(&self.snap_root)
            .args(&self.snapshotter_args)
            // `LSM_TEST_RUST_LOG=info,lsm::fetch=debug` logs every fetch of the snapshots'
            // lsmds (in `lsm-root/attach/lsmd-*.log`; see README "What a lazy start fetches").
            .env(
                "RUST_LOG",
                std::env::var("LSM_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("snapshotter log"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        // A socket left by a killed run must not count as the new one being up.
        let _ = std::fs::remove_file(&self.snap_socket);
        let mut child = cmd.spawn().expect("start lsm-snapshotter");
        wait_for_socket(&self.snap_socket, &mut child, "lsm-snapshotter", &log);
        self.snapshotter = Some(child);
    }

    /// Like [`Containerd::ctr_ok`], but retries (for up to 60 s) while containerd reports the
    /// snapshotter unavailable: after a restart gRPC reconnects with a backoff. Use it for the
    /// first call that reaches a restarted snapshotter.
    pub fn ctr_ok_reconnecting(&self, args: &[&str]) -> String {
        for _ in 0..600 {
            let o = run(&mut self.ctr(args));
            if o.status.success() {
                return String::from_utf8_lossy(&o.stdout).into_owned();
            }
            if !String::from_utf8_lossy(&o.stderr).contains("unavailable") {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.ctr_ok(args)
    }

    /// The running snapshotter process (to kill or wait for).
    pub fn snapshotter(&mut self) -> &mut Child {
        self.snapshotter.as_mut().expect("snapshotter running")
    }

    /// Waits for the snapshotter to exit (e.g. after it aborted).
    pub fn wait_snapshotter_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.snapshotter.take().expect("snapshotter running");
        child.wait().expect("wait snapshotter")
    }

    /// `ctr` against this containerd, in the test namespace.
    pub fn ctr<I: IntoIterator<Item = S>, S: AsRef<std::ffi::OsStr>>(&self, args: I) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(&self.address)
            .args(["--namespace", NAMESPACE])
            .args(args);
        c
    }

    /// Runs `ctr` that must succeed; returns stdout.
    pub fn ctr_ok<I: IntoIterator<Item = S>, S: AsRef<std::ffi::OsStr>>(&self, args: I) -> String {
        self.succeed(self.ctr(args))
    }

    /// Runs `ctr` in namespace `namespace` (e.g. CRI's `k8s.io`); it must succeed. Returns
    /// stdout.
    pub fn ctr_in(&self, namespace: &str, args: &[&str]) -> String {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.address)
            .args(["--namespace", namespace])
            .args(args);
        self.succeed(cmd)
    }

    /// Runs `cmd`, which must succeed (else the failure, both outputs and the daemons' logs);
    /// returns stdout.
    fn succeed(&self, mut cmd: Command) -> String {
        let o = run(&mut cmd);
        assert!(
            o.status.success(),
            "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs `ctr` expected to fail.
    pub fn ctr_output<I: IntoIterator<Item = S>, S: AsRef<std::ffi::OsStr>>(
        &self,
        args: I,
    ) -> Output {
        run(&mut self.ctr(args))
    }

    /// The tails of containerd's and the snapshotter's logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let mut names: Vec<String> = (1..=self.containerd_runs)
            .map(|i| self.containerd_log(i))
            .collect();
        names.extend((1..=self.snapshotter_runs).map(|i| format!("snapshotter.{i}.log")));
        for name in names {
            let text = std::fs::read_to_string(self.dir.join(&name)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!("--- {name} (last lines)\n"));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Stop every task of the test namespace first, so no shim outlives the test.
        if let Ok(o) = self.ctr(["tasks", "ls", "-q"]).output() {
            for id in String::from_utf8_lossy(&o.stdout).lines() {
                let _ = self.ctr(["tasks", "kill", "-s", "SIGKILL", id]).output();
                std::thread::sleep(Duration::from_millis(200));
                let _ = self.ctr(["tasks", "delete", "-f", id]).output();
            }
        }
        for child in [self.containerd.take(), self.snapshotter.take()]
            .into_iter()
            .flatten()
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        // Unmount whatever containerd left mounted under the test directory.
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
            let prefix = self.dir.display().to_string();
            let mut targets: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split(' ').nth(1))
                .filter(|t| t.starts_with(&prefix))
                .collect();
            targets.reverse();
            for t in targets {
                let _ = Command::new("umount").arg("-l").arg(t).output();
            }
        }
        // Then stop the lsmd of every snapshot disk (they outlive the snapshotter on purpose).
        let attach = self.snap_root.join("attach");
        if let Ok(o) = crate::lsmctl(["list", "--json", "--state-dir"])
            .arg(&attach)
            .output()
        {
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
            for a in v.as_array().into_iter().flatten() {
                if let Some(name) = a["name"].as_str() {
                    let _ = crate::lsmctl(["detach", name, "--state-dir"])
                        .arg(&attach)
                        .output();
                }
            }
        }
    }
}

/// Builds a two-layer OCI image layout at `layout` (tag `tiny`) with umoci: layer 1 is the
/// host's static `busybox` at `/bin/busybox`, layer 2 `/etc/greeting` holding `greeting`.
/// Returns an OCI archive (tar of the layout) for `ctr image import`.
pub fn tiny_image(dir: &Path, greeting: &str) -> PathBuf {
    let layout = dir.join("oci");
    let image = format!("{}:tiny", layout.display());
    ok(Command::new("umoci")
        .args(["init", "--layout"])
        .arg(&layout));
    ok(Command::new("umoci").args(["new", "--image", &image]));
    ok(Command::new("umoci").args([
        "insert",
        "--image",
        &image,
        "/usr/bin/busybox",
        "/bin/busybox",
    ]));
    let greet = dir.join("greeting");
    std::fs::write(&greet, greeting).expect("greeting");
    ok(Command::new("umoci")
        .args(["insert", "--image", &image])
        .arg(&greet)
        .arg("/etc/greeting"));
    ok(Command::new("umoci").args(["config", "--image", &image, "--config.cmd", "/bin/busybox"]));
    let tar = dir.join("tiny.tar");
    ok(Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&tar)
        .arg("."));
    tar
}

//! The sandbox `trace bake` runs the startup command in: a private lsmd serving the image as a
//! FUSE file, a read-only loop device over it, its filesystem mounted, and the command in its
//! own namespaces over that mount.
//!
//! Torn down on every way out, in reverse: the command killed (its whole PID namespace), the
//! mount unmounted (lazily when still busy), the loop device detached, lsmd stopped, its FUSE
//! mount and the directory removed —
//! - on return or error, and on a panic, by dropping the [`Sandbox`] guard;
//! - on SIGINT, SIGTERM or SIGHUP, by lsmctl's signal thread (`crate::interrupt`), which then
//!   exits with 128 + the signal;
//! - when lsmctl itself is killed (SIGKILL), nothing of lsmctl runs: the kernel signals its
//!   lsmd (SIGTERM) and the command's namespace (SIGKILL) through `PR_SET_PDEATHSIG`; the
//!   mount and the loop device then stay until someone unmounts them.
//!
//! Concurrency: one bake per process. What is set up lives in one process-wide slot
//! ([`PARTS`]); the main thread records each part there as soon as it exists (the lock held
//! only for that, and for each poll of a child), and whichever of the guard's drop and the
//! signal thread takes the slot first tears the parts down — the other finds it empty, and the
//! signal thread exits only once a teardown the main thread began is over ([`TEARING`]). A part
//! started after the signal thread took the slot is stopped by `PR_SET_PDEATHSIG` when the
//! process exits.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lsmd::frontend::loop_device;

use crate::cli::{CliError, CliResult};

/// What is set up, torn down in reverse by [`Parts::tear_down`].
struct Parts {
    dir: PathBuf,
    lsmd: Option<Child>,
    loop_dev: Option<String>,
    mounted: bool,
    /// The command's `unshare` (with `--kill-child`: killing it kills the namespace's init,
    /// and with it every process of the command).
    command: Option<Child>,
}

/// The parts of this process's bake; `None` before it starts and once torn down.
static PARTS: Mutex<Option<Parts>> = Mutex::new(None);
/// Held while parts are torn down: the signal thread exits only after a teardown the main
/// thread began is over.
static TEARING: Mutex<()> = Mutex::new(());

fn parts() -> MutexGuard<'static, Option<Parts>> {
    PARTS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `f` on the parts, or fails when they are gone (a signal tore them down; the process
/// is about to exit).
fn with_parts<T>(f: impl FnOnce(&mut Parts) -> T) -> CliResult<T> {
    match parts().as_mut() {
        Some(p) => Ok(f(p)),
        None => Err(CliError("interrupted: the sandbox is torn down".into())),
    }
}

/// The guard of a bake's sandbox: dropping it tears down what was set up.
pub struct Sandbox {
    dir: PathBuf,
}

impl Sandbox {
    /// A fresh sandbox in `dir` (created), with the signal thread installed.
    pub fn new(dir: PathBuf) -> CliResult<Sandbox> {
        std::fs::create_dir_all(&dir)?;
        install_handler();
        let mut slot = parts();
        if slot.is_some() {
            return Err(CliError("a bake is already running in this process".into()));
        }
        *slot = Some(Parts {
            dir: dir.clone(),
            lsmd: None,
            loop_dev: None,
            mounted: false,
            command: None,
        });
        Ok(Sandbox { dir })
    }

    /// The sandbox's directory (lsmd's FUSE mount is `files`, the filesystem `mnt`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _tearing = TEARING.lock().unwrap_or_else(|p| p.into_inner());
        let taken = parts().take();
        if let Some(p) = taken {
            p.tear_down();
        }
    }
}

fn install_handler() {
    crate::interrupt::on_interrupt("trace bake", interrupted);
}

/// At a signal: tears down what is up, once a teardown the main thread began is over.
fn interrupted(sig: i32) {
    let _tearing = TEARING.lock().unwrap_or_else(|p| p.into_inner());
    let taken = parts().take();
    if let Some(p) = taken {
        p.tear_down();
    }
    eprintln!("trace bake: interrupted by signal {sig}; sandbox torn down");
}

/// Asks the kernel to send `sig` to the child when this process dies.
fn die_with_parent(cmd: &mut Command, sig: libc::c_int) {
    // SAFETY: prctl(2) only, between fork and exec (async-signal-safe, touches no memory of
    // the parent).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl Parts {
    fn tear_down(mut self) {
        if let Some(mut c) = self.command.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let mnt = self.dir.join("mnt");
        if self.mounted {
            unmount(&mnt);
        }
        if let Some(l) = self.loop_dev.take() {
            let _ = loop_device::detach_loop(&l);
            // The loop device lets go of the FUSE file asynchronously.
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(5) && loop_device::loop_holds_file(&l) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(mut c) = self.lsmd.take() {
            // SAFETY: kill(2) on the pid of a child we started and have not reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let files = self.dir.join("files");
        if is_mountpoint(&files) {
            let _ = Command::new("umount").arg("-l").arg(&files).status();
        }
        // Never into a filesystem still mounted there (it is read-only, but not ours to empty).
        if !is_mountpoint(&mnt) && !is_mountpoint(&files) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Unmounts `mnt`: a few tries while the command's last processes let go of it, then lazily
/// (detached now, gone when its last user is).
fn unmount(mnt: &Path) {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(2) {
        let ok = Command::new("umount")
            .arg(mnt)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok || !is_mountpoint(mnt) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = Command::new("umount").arg("-l").arg(mnt).status();
}

fn is_mountpoint(p: &Path) -> bool {
    let p = p.to_string_lossy();
    std::fs::read_to_string("/proc/mounts")
        .map(|m| m.lines().any(|l| l.split(' ').nth(1) == Some(&p)))
        .unwrap_or(false)
}

fn run(cmd: &mut Command, what: &str) -> CliResult<String> {
    let out = cmd.output().map_err(|e| CliError(format!("{what}: {e}")))?;
    if !out.status.success() {
        return Err(CliError(format!(
            "{what}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Serves `image` from a private lsmd and mounts it read-only under the sandbox's `mnt`.
pub fn mount_image(
    sb: &Sandbox,
    image: &Path,
    lsmd: &Path,
    metrics: &str,
    read_ahead_kb: u32,
) -> CliResult {
    let (files, mnt) = (sb.dir.join("files"), sb.dir.join("mnt"));
    std::fs::create_dir_all(&files)?;
    std::fs::create_dir_all(&mnt)?;
    let log = std::fs::File::create(sb.dir.join("lsmd.log"))?;
    let mut config = std::ffi::OsString::from("image=");
    config.push(image.canonicalize()?);
    let mut cmd = Command::new(lsmd);
    cmd.arg("serve")
        .arg("--config")
        .arg(&config)
        .arg("--fuse")
        .arg(&files)
        .arg("--cache-dir")
        .arg(sb.dir.join("cache"))
        .arg("--socket")
        .arg(sb.dir.join("sock"))
        .args(["--prefetch", "none", "--exact-trace", "--metrics", metrics])
        .stdout(Stdio::null())
        .stderr(log);
    die_with_parent(&mut cmd, libc::SIGTERM);
    let child = cmd
        .spawn()
        .map_err(|e| CliError(format!("{}: {e}", lsmd.display())))?;
    with_parts(|p| p.lsmd = Some(child))?;
    let file = files.join("image");
    let t0 = Instant::now();
    while !file.exists() {
        let exited = with_parts(|p| p.lsmd.as_mut().map(|c| matches!(c.try_wait(), Ok(Some(_)))))?;
        if exited == Some(true) || t0.elapsed() > Duration::from_secs(60) {
            let log = std::fs::read_to_string(sb.dir.join("lsmd.log")).unwrap_or_default();
            return Err(CliError(format!("lsmd did not serve the image: {log}")));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // The readahead the nodes' disks have (not the loop's 2560 KiB): what the kernel reads
    // ahead here lands in the trace, and every node would fetch it.
    let dev = loop_device::attach_loop(&file, true, read_ahead_kb).map_err(CliError)?;
    with_parts(|p| p.loop_dev = Some(dev.clone()))?;
    // ext4 without replaying a journal (read-only device); other filesystems plain read-only.
    let ext4 = run(
        Command::new("mount")
            .args(["-o", "ro,noload", &dev])
            .arg(&mnt),
        "mount",
    );
    if ext4.is_err() {
        run(
            Command::new("mount").args(["-o", "ro", &dev]).arg(&mnt),
            "mount",
        )?;
    }
    with_parts(|p| p.mounted = true)
}

/// Runs `command` once in the sandbox over its `mnt`, failing if it fails or outlives
/// `timeout`; on a failure or a timeout every process of the command is gone on return.
pub fn run_command(sb: &Sandbox, command: &[String], timeout: Duration) -> CliResult {
    // In its own mount namespace (private: nothing leaks to the host, all gone when it
    // exits), the image gets the host's /dev and a /proc of its PID namespace where it has
    // those directories, as a container runtime would give them. `--kill-child`: killing
    // unshare kills the namespace's init, and so every process the command started.
    const SETUP: &str = "[ -d \"$1/dev\" ] && mount --rbind /dev \"$1/dev\"; \
        [ -d \"$1/proc\" ] && mount -t proc proc \"$1/proc\"; \
        exec chroot \"$1\" /bin/sh -c \"$2\"";
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--net", "--pid", "--ipc", "--uts", "--fork"])
        .arg("--kill-child")
        .args(["/bin/sh", "-c", SETUP, "sh"])
        .arg(sb.dir.join("mnt"))
        .arg(command.join(" "))
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    die_with_parent(&mut cmd, libc::SIGKILL);
    let child = cmd.spawn().map_err(|e| CliError(format!("unshare: {e}")))?;
    with_parts(|p| p.command = Some(child))?;
    let t0 = Instant::now();
    loop {
        let status = with_parts(|p| match p.command.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(st))) => {
                p.command = None;
                Ok(Some(st))
            }
            Some(Ok(None)) => Ok(None),
            Some(Err(e)) => Err(e),
            None => Err(std::io::Error::other("the command is gone")),
        })??;
        if let Some(st) = status {
            if !st.success() {
                return Err(CliError(format!(
                    "the command failed inside the image ({st}): {}",
                    command.join(" ")
                )));
            }
            return Ok(());
        }
        if t0.elapsed() > timeout {
            with_parts(|p| {
                if let Some(mut c) = p.command.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            })?;
            return Err(CliError(format!("the command ran longer than {timeout:?}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

//! `lsmctl attach | detach | list`: make an image a kernel block device (or a FUSE file) in one
//! command. `attach` starts a detached `lsmd serve` for the image with the right frontend,
//! waits until the device is up, records the attachment in the state directory and prints the
//! device; `detach` stops that lsmd (SIGTERM: the kernel's requests complete, upper layers are
//! flushed, the device goes); `list` shows what is attached.
//!
//! `detach` signals only the lsmd the record describes: the record keeps the process's start
//! time and executable, and before signalling, `detach` opens a pidfd for the pid, then checks
//! through /proc that the process is an lsmd started at that time, serving that image under that
//! name; the signal goes through the pidfd, so a pid recycled between check and signal cannot
//! be hit. A pid that is not such an lsmd (0, 1, a recycled pid, a hand-edited record) is
//! refused with the reason.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use lsmd::frontend::loop_device;

use crate::cli::{CliError, CliResult};

/// Arguments of `lsmctl attach`.
#[derive(clap::Args)]
pub struct AttachArgs {
    /// Image config to attach.
    image: PathBuf,
    /// Attach as this nbd device (e.g. /dev/nbd0).
    #[arg(long, conflicts_with_all = ["ublk", "fuse"])]
    nbd: Option<PathBuf>,
    /// Attach as a ublk device (/dev/ublkbN, numbered by the kernel).
    #[arg(long, conflicts_with = "fuse")]
    ublk: bool,
    /// Expose as a file in this directory (FUSE), for `losetup` (or `--loop`).
    #[arg(long)]
    fuse: Option<PathBuf>,
    /// With --fuse: also attach the FUSE file to a loop device (read-only with --read-only),
    /// with readahead --read-ahead-kb, and print that device; `detach` detaches it.
    #[arg(long, requires = "fuse")]
    r#loop: bool,
    /// Readahead (KiB) of the block device made (nbd, ublk, or the loop with --loop). Every
    /// page the kernel reads ahead is a chunk fetched from the registry; a loop device gets
    /// 2560 KiB from the kernel, which made a python start fetch nearly twice what it needed.
    /// 0 keeps the kernel's choice.
    #[arg(long, value_name = "KIB", default_value_t = loop_device::READ_AHEAD_KB)]
    read_ahead_kb: u32,
    /// Name of the attachment (default: the image file name without `.json`).
    #[arg(long)]
    name: Option<String>,
    /// Refuse writes; reads still see the upper layer.
    #[arg(long)]
    read_only: bool,
    /// Where attachments (and lsmd's device ids) are recorded.
    #[arg(long, default_value = "/run/lsm")]
    state_dir: PathBuf,
    /// More `lsmd serve` arguments, e.g. `--cache-dir DIR` (after `--`).
    #[arg(last = true)]
    lsmd_args: Vec<String>,
}

/// Arguments of `lsmctl detach`.
#[derive(clap::Args)]
pub struct DetachArgs {
    /// Attachment name, or its device (/dev/nbd0, /dev/ublkb0, the FUSE file, its --loop).
    target: String,
    #[arg(long, default_value = "/run/lsm")]
    state_dir: PathBuf,
}

/// Arguments of `lsmctl list`.
#[derive(clap::Args)]
pub struct ListArgs {
    #[arg(long, default_value = "/run/lsm")]
    state_dir: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// One attachment, as recorded in `<state_dir>/attach-<name>.json`.
#[derive(Debug, Serialize, Deserialize)]
struct Attachment {
    name: String,
    image: PathBuf,
    kind: String,
    device: String,
    pid: u32,
    log: PathBuf,
    /// The lsmd's start time (/proc/PID/stat field 22, clock ticks after boot); older records
    /// lack it and are checked by executable and command line only.
    #[serde(default)]
    start_time: Option<u64>,
    /// The loop device `--loop` made over the FUSE file (`device`), detached by `detach`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    loop_device: Option<String>,
}

fn record_path(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join(format!("attach-{name}.json"))
}

/// (state, start time) of process `pid` from /proc/PID/stat; `None` if there is no such
/// process.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// Why process `pid` is not the lsmd serving attachment `r` (`None`: it is).
fn not_our_lsmd(r: &Attachment) -> Option<String> {
    let pid = r.pid;
    if pid <= 1 || pid > i32::MAX as u32 {
        return Some(format!("pid {pid} can never be an lsmd started by attach"));
    }
    let Some((state, start)) = proc_stat(pid) else {
        return Some(format!("no process {pid} (the lsmd is gone)"));
    };
    if state == 'Z' {
        return Some(format!("process {pid} has exited (the lsmd is gone)"));
    }
    if let Some(recorded) = r.start_time {
        if recorded != start {
            return Some(format!(
                "process {pid} started at tick {start}, the lsmd at tick {recorded}: the pid now \
                 belongs to another process"
            ));
        }
    }
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| format!("(unreadable: {e})"));
    let exe_name = exe.trim_end_matches(" (deleted)").rsplit('/').next();
    if exe_name != Some("lsmd") {
        return Some(format!("process {pid} is {exe}, not lsmd"));
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let config = format!("{}={}", r.name, r.image.display());
    let serves = cmdline.split(|&b| b == 0).any(|a| a == config.as_bytes());
    if !serves {
        return Some(format!(
            "process {pid} is an lsmd, but not the one serving {config}"
        ));
    }
    None
}

/// True when the attachment's lsmd still runs.
fn alive(r: &Attachment) -> bool {
    not_our_lsmd(r).is_none()
}

/// A pidfd: a handle on one process that a recycled pid can never redirect.
pub(crate) struct PidFd(std::os::fd::OwnedFd);

impl PidFd {
    /// `None` when there is no process `pid`.
    pub(crate) fn open(pid: u32) -> std::io::Result<Option<PidFd>> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ESRCH) => Ok(None),
                _ => Err(e),
            };
        }
        // SAFETY: the kernel just gave us this descriptor; nothing else owns it.
        Ok(Some(PidFd(unsafe {
            std::os::fd::FromRawFd::from_raw_fd(fd as i32)
        })))
    }

    pub(crate) fn signal(&self, sig: libc::c_int) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: signals exactly the process the pidfd refers to; no siginfo passed.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `limit` for the process to exit; true if it did.
    fn wait_exit(&self, limit: Duration) -> bool {
        use std::os::fd::AsRawFd;
        let start = Instant::now();
        loop {
            let left = limit.saturating_sub(start.elapsed());
            let mut p = libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut p, 1, left.as_millis().min(i32::MAX as u128) as i32) };
            if n > 0 {
                return true;
            }
            if n == 0 || left.is_zero() {
                return false;
            }
        }
    }
}

fn lsmd_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("lsmd")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("lsmd"))
}

/// Waits for `ready` (or the lsmd to die) for up to 30 s.
fn wait_for(
    child: &mut std::process::Child,
    log: &Path,
    mut ready: impl FnMut() -> Option<String>,
) -> CliResult<String> {
    let start = Instant::now();
    loop {
        if let Some(dev) = ready() {
            return Ok(dev);
        }
        if let Ok(Some(status)) = child.try_wait() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            return Err(CliError(format!(
                "lsmd exited ({status}):\n{}",
                text.trim_end()
            )));
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            return Err(CliError(format!(
                "the device did not come up within 30 s (log: {})",
                log.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn attach(a: AttachArgs) -> CliResult {
    let name = a.name.clone().unwrap_or_else(|| {
        a.image
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into())
    });
    std::fs::create_dir_all(&a.state_dir)?;
    let rec = record_path(&a.state_dir, &name);
    if let Ok(text) = std::fs::read_to_string(&rec) {
        if let Ok(old) = serde_json::from_str::<Attachment>(&text) {
            if alive(&old) {
                return Err(CliError(format!(
                    "{name} is already attached as {} (lsmd pid {})",
                    old.device, old.pid
                )));
            }
        }
    }
    let image = std::fs::canonicalize(&a.image)
        .map_err(|e| CliError(format!("{}: {e}", a.image.display())))?;
    let mut args: Vec<std::ffi::OsString> = vec!["serve".into(), "--config".into()];
    args.push(format!("{name}={}", image.display()).into());
    args.push("--state-dir".into());
    args.push(a.state_dir.clone().into());
    let kind = if let Some(dev) = &a.nbd {
        args.push("--nbd-device".into());
        args.push(format!("{name}={}", dev.display()).into());
        "nbd"
    } else if a.ublk {
        args.push("--ublk".into());
        args.push(name.clone().into());
        "ublk"
    } else if let Some(dir) = &a.fuse {
        std::fs::create_dir_all(dir)?;
        args.push("--fuse".into());
        args.push(dir.clone().into());
        "fuse"
    } else {
        return Err(CliError(
            "say how to attach: --nbd /dev/nbdN, --ublk or --fuse DIR".into(),
        ));
    };
    if a.read_only {
        args.push("--read-only".into());
    }
    args.extend(a.lsmd_args.iter().map(Into::into));
    let log = a.state_dir.join(format!("lsmd-{name}.log"));
    let logf = std::fs::File::create(&log)?;
    let mut cmd = std::process::Command::new(lsmd_binary());
    cmd.args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf);
    // Its own session: the daemon outlives this command and the terminal.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd
        .spawn()
        .map_err(|e| CliError(format!("cannot start lsmd: {e}")))?;
    let state_dir = a.state_dir.clone();
    let device = match kind {
        "nbd" => {
            let dev = a.nbd.clone().unwrap_or_default();
            let idx = dev
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            wait_for(&mut child, &log, || {
                let size = std::fs::read_to_string(format!("/sys/block/{idx}/size")).ok()?;
                (size.trim() != "0").then(|| dev.display().to_string())
            })?
        }
        "ublk" => wait_for(&mut child, &log, || {
            let id = std::fs::read_to_string(state_dir.join(format!("ublk-{name}.id"))).ok()?;
            let dev = format!("/dev/ublkb{}", id.trim());
            Path::new(&dev).exists().then_some(dev)
        })?,
        _ => {
            let file = a.fuse.clone().unwrap_or_default().join(&name);
            wait_for(&mut child, &log, || {
                file.exists().then(|| file.display().to_string())
            })?
        }
    };
    let loop_dev = match kind {
        "fuse" if a.r#loop => Some(loop_device::attach_loop(
            Path::new(&device),
            a.read_only,
            a.read_ahead_kb,
        )),
        "fuse" => None,
        _ => {
            // The device is up: its readahead is set before anything opens it.
            let set = loop_device::set_read_ahead(Path::new(&device), a.read_ahead_kb);
            if let Err(e) = set {
                eprintln!("lsmctl attach: {e} (the device works, but fetches what it reads ahead)");
            }
            None
        }
    };
    let loop_dev = match loop_dev.transpose() {
        Ok(l) => l,
        Err(e) => {
            // Nothing recorded yet: stop the lsmd again, as if attach had never run.
            if let Ok(Some(pidfd)) = PidFd::open(child.id()) {
                let _ = pidfd.signal(libc::SIGTERM);
                pidfd.wait_exit(Duration::from_secs(60));
            }
            let _ = child.wait();
            return Err(CliError(e));
        }
    };
    let record = Attachment {
        name: name.clone(),
        image,
        kind: kind.into(),
        device: device.clone(),
        pid: child.id(),
        log,
        start_time: proc_stat(child.id()).map(|(_, start)| start),
        loop_device: loop_dev.clone(),
    };
    std::fs::write(&rec, serde_json::to_string_pretty(&record)?)?;
    println!("{}", loop_dev.unwrap_or(device));
    Ok(())
}

/// Detaches the loop device `--loop` made over attachment `r`'s FUSE file, waiting for the
/// kernel to let go of the file; an error (and the lsmd left running) while something still
/// holds the device, such as a mount.
fn detach_loop_of(r: &Attachment) -> CliResult {
    let Some(dev) = &r.loop_device else {
        return Ok(());
    };
    // Only a loop device still backed by this attachment's FUSE file is ours to detach.
    let name = dev.trim_start_matches("/dev/");
    // The kernel names the backing file by its absolute path; the record has it as given.
    let absolute = std::fs::canonicalize(&r.device).ok();
    // Checked before every request: a cleared device may be someone else's a moment later.
    let ours = || {
        std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).is_ok_and(|b| {
            let b = PathBuf::from(b.trim());
            b == Path::new(&r.device) || Some(&b) == absolute.as_ref()
        })
    };
    if !ours() {
        return Ok(());
    }
    // A device being cleared (autoclear after its last unmount) may refuse `-d`, and so may a
    // short-lived opener (udev's probe after a change event): what counts is whether it lets
    // go of the file. Asked again every half second, for up to 10 s.
    let mut asked = loop_device::detach_loop(dev);
    let t0 = Instant::now();
    let mut last_ask = Instant::now();
    while ours() {
        if t0.elapsed() > Duration::from_secs(10) {
            let why = asked.err().map(|e| format!(" ({e})")).unwrap_or_default();
            return Err(CliError(format!(
                "{dev} is still in use{why}: unmount it first (it goes with its last mount), \
                 then detach again"
            )));
        }
        if last_ask.elapsed() > Duration::from_millis(500) {
            asked = loop_device::detach_loop(dev);
            last_ask = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn records(state_dir: &Path) -> Vec<Attachment> {
    let mut out: Vec<Attachment> = std::fs::read_dir(state_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with("attach-") && n.ends_with(".json")
        })
        .filter_map(|e| serde_json::from_str(&std::fs::read_to_string(e.path()).ok()?).ok())
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

pub fn detach(a: DetachArgs) -> CliResult {
    let Some(r) = records(&a.state_dir).into_iter().find(|r| {
        r.name == a.target || r.device == a.target || r.loop_device.as_ref() == Some(&a.target)
    }) else {
        return Err(CliError(format!(
            "nothing called {} is attached (see lsmctl list)",
            a.target
        )));
    };
    let rec = record_path(&a.state_dir, &r.name);
    // The pidfd first, the checks second: whatever passes the checks is what gets the signal.
    let pidfd = if (2..=i32::MAX as u32).contains(&r.pid) {
        PidFd::open(r.pid).map_err(|e| CliError(format!("pidfd_open({}): {e}", r.pid)))?
    } else {
        None
    };
    match (pidfd, not_our_lsmd(&r)) {
        (Some(pidfd), None) => {
            detach_loop_of(&r)?;
            pidfd
                .signal(libc::SIGTERM)
                .map_err(|e| CliError(format!("cannot signal lsmd {}: {e}", r.pid)))?;
            if !pidfd.wait_exit(Duration::from_secs(60)) {
                return Err(CliError(format!("lsmd {} did not stop within 60 s", r.pid)));
            }
        }
        (None, _) if (2..=i32::MAX as u32).contains(&r.pid) => {} // the lsmd is gone
        (_, why) => {
            let why = why.unwrap_or_else(|| format!("pid {} cannot be checked", r.pid));
            return Err(CliError(format!(
                "refusing to signal pid {} for {}: {why}. Nothing was signalled; if the \
                 attachment is gone, remove {}",
                r.pid,
                r.name,
                rec.display()
            )));
        }
    }
    let _ = std::fs::remove_file(&rec);
    println!("detached {} ({})", r.name, r.device);
    Ok(())
}

pub fn list(a: ListArgs) -> CliResult {
    let rs = records(&a.state_dir);
    if a.json {
        let v: Vec<serde_json::Value> = rs
            .iter()
            .map(|r| {
                serde_json::json!({"name": r.name, "image": r.image, "kind": r.kind,
                    "device": r.device, "loop_device": r.loop_device, "pid": r.pid,
                    "running": alive(r)})
            })
            .collect();
        println!("{}", serde_json::Value::from(v));
        return Ok(());
    }
    if rs.is_empty() {
        println!("nothing attached");
    }
    for r in rs {
        let state = if alive(&r) { "running" } else { "lsmd gone" };
        println!(
            "{:<16} {:<5} {:<22} pid {:<8} {state}  {}",
            r.name,
            r.kind,
            r.loop_device.as_ref().unwrap_or(&r.device),
            r.pid,
            r.image.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(pid: u32) -> Attachment {
        Attachment {
            name: "app".into(),
            image: "/nonexistent/app.json".into(),
            kind: "fuse".into(),
            device: "/nonexistent/app".into(),
            pid,
            log: "/nonexistent/log".into(),
            start_time: None,
            loop_device: None,
        }
    }

    #[test]
    fn pids_that_address_groups_or_init_are_never_ours() {
        // 0 is the caller's process group, -1 every process, 1 init.
        for pid in [0, 1, u32::MAX, i32::MAX as u32 + 1] {
            let why = not_our_lsmd(&record(pid)).expect("refused");
            assert!(why.contains(&pid.to_string()), "{why}");
        }
    }

    #[test]
    fn this_test_process_is_not_an_lsmd() {
        let why = not_our_lsmd(&record(std::process::id())).expect("refused");
        assert!(why.contains("not lsmd"), "{why}");
    }
}

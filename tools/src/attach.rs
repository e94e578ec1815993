//! `lsmctl attach | detach | list`: make an image a kernel block device (or a FUSE file) in one
//! command. `attach` starts a detached `lsmd serve` for the image with the right frontend,
//! waits until the device is up, records the attachment in the state directory and prints the
//! device; `detach` stops that lsmd (SIGTERM: the kernel's requests complete, upper layers are
//! flushed, the device goes); `list` shows what is attached.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::{CliError, CliResult};

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
    /// Expose as a file in this directory (FUSE), for `losetup`.
    #[arg(long)]
    fuse: Option<PathBuf>,
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
    /// Attachment name, or its device (/dev/nbd0, /dev/ublkb0, the FUSE file).
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
}

fn record_path(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join(format!("attach-{name}.json"))
}

fn alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
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
            if alive(old.pid) {
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
    let record = Attachment {
        name: name.clone(),
        image,
        kind: kind.into(),
        device: device.clone(),
        pid: child.id(),
        log,
    };
    std::fs::write(&rec, serde_json::to_string_pretty(&record)?)?;
    println!("{device}");
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
    let Some(r) = records(&a.state_dir)
        .into_iter()
        .find(|r| r.name == a.target || r.device == a.target)
    else {
        return Err(CliError(format!(
            "nothing called {} is attached (see lsmctl list)",
            a.target
        )));
    };
    if alive(r.pid) {
        // SAFETY: signalling the lsmd this attachment started.
        unsafe {
            libc::kill(r.pid as libc::pid_t, libc::SIGTERM);
        }
        let start = Instant::now();
        while alive(r.pid) && start.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(50));
            // Reap it if it is our child's child (it is not): a zombie counts as gone.
            if std::fs::read_to_string(format!("/proc/{}/stat", r.pid))
                .is_ok_and(|s| s.split_whitespace().nth(2) == Some("Z"))
            {
                break;
            }
        }
        if alive(r.pid)
            && !std::fs::read_to_string(format!("/proc/{}/stat", r.pid))
                .is_ok_and(|s| s.split_whitespace().nth(2) == Some("Z"))
        {
            return Err(CliError(format!("lsmd {} did not stop within 60 s", r.pid)));
        }
    }
    let _ = std::fs::remove_file(record_path(&a.state_dir, &r.name));
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
                    "device": r.device, "pid": r.pid, "running": alive(r.pid)})
            })
            .collect();
        println!("{}", serde_json::Value::from(v));
        return Ok(());
    }
    if rs.is_empty() {
        println!("nothing attached");
    }
    for r in rs {
        let state = if alive(r.pid) { "running" } else { "lsmd gone" };
        println!(
            "{:<16} {:<5} {:<22} pid {:<8} {state}  {}",
            r.name,
            r.kind,
            r.device,
            r.pid,
            r.image.display()
        );
    }
    Ok(())
}

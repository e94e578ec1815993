//! Loop devices over an export's FUSE file, and the readahead of the block devices lsm makes.
//!
//! Why the readahead matters: every page the kernel reads ahead on a lazily served disk is a
//! chunk fetched from the registry. The kernel gives a loop device 2560 KiB of readahead (the
//! 6.x kernel these hosts run, whatever the backing file), and a page fault in a mapped shared
//! library reads that much around it: a python start baked through a loop device
//! fetched 10.4 MB where the same start through lsm-snapshotter's 128 KiB disks fetched 5.7 MB
//! (README "What a lazy start fetches"). So everything in lsm that makes a loop device (`lsmctl
//! attach --fuse --loop`, `lsmctl trace bake`'s sandbox) goes through [`attach_loop`], which
//! sets [`READ_AHEAD_KB`] unless told otherwise, before anything is mounted from it (a file
//! opened on the device keeps the readahead it found at open).
//!
//! The loop device is made with `losetup` (util-linux), as users and the snapshotter make it,
//! rather than with LOOP_CTL_GET_FREE + LOOP_CONFIGURE ioctls: one less `unsafe` edge, and
//! `losetup` already handles the races between two callers taking the same free device.

use std::path::Path;
use std::process::Command;

/// The readahead (KiB) lsm gives the block devices it makes, unless told otherwise: the
/// kernel's own default for most block devices, and what lsm-snapshotter's
/// `--read-ahead-kb` defaults to.
pub const READ_AHEAD_KB: u32 = 128;

/// Sets the readahead of block device `device` (a path such as `/dev/loop3`, symlinks
/// followed) to `kb` KiB through `/sys/block/NAME/queue/read_ahead_kb`. `kb` = 0 leaves the
/// kernel's choice alone.
pub fn set_read_ahead(device: &Path, kb: u32) -> Result<(), String> {
    if kb == 0 {
        return Ok(());
    }
    let real = device
        .canonicalize()
        .map_err(|e| format!("{}: {e}", device.display()))?;
    let name = real
        .file_name()
        .ok_or_else(|| format!("{}: not a device path", device.display()))?
        .to_string_lossy()
        .into_owned();
    let knob = format!("/sys/block/{name}/queue/read_ahead_kb");
    std::fs::write(&knob, kb.to_string()).map_err(|e| {
        format!(
            "cannot set the readahead of {} to {kb} KiB ({knob}): {e}",
            device.display()
        )
    })
}

/// The readahead (KiB) of block device `device`, as the kernel reports it.
pub fn read_ahead(device: &Path) -> Result<u32, String> {
    let real = device
        .canonicalize()
        .map_err(|e| format!("{}: {e}", device.display()))?;
    let name = real.file_name().unwrap_or_default().to_string_lossy();
    let knob = format!("/sys/block/{name}/queue/read_ahead_kb");
    let text = std::fs::read_to_string(&knob).map_err(|e| format!("{knob}: {e}"))?;
    text.trim()
        .parse()
        .map_err(|e| format!("{knob}: {text:?}: {e}"))
}

/// Attaches `file` (an export's FUSE file) to a free loop device — read-only when
/// `read_only` — with readahead `read_ahead_kb` (0: the kernel's), and returns the device
/// (`/dev/loopN`). If the readahead cannot be set, the loop device is detached again and the
/// error returned: a device that silently fetches twenty times what is read is not what was
/// asked for.
pub fn attach_loop(file: &Path, read_only: bool, read_ahead_kb: u32) -> Result<String, String> {
    let mut cmd = Command::new("losetup");
    if read_only {
        cmd.arg("-r");
    }
    let out = cmd
        .args(["-f", "--show"])
        .arg(file)
        .output()
        .map_err(|e| format!("losetup: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "losetup {}: {}: {}",
            file.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if let Err(e) = set_read_ahead(Path::new(&dev), read_ahead_kb) {
        let _ = detach_loop(&dev);
        return Err(e);
    }
    Ok(dev)
}

/// Detaches loop device `dev` (`losetup -d`: a device still mounted goes when it is
/// unmounted — autoclear).
pub fn detach_loop(dev: &str) -> Result<(), String> {
    let out = Command::new("losetup")
        .args(["-d", dev])
        .output()
        .map_err(|e| format!("losetup -d: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "losetup -d {dev}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// True while loop device `dev` still has a backing file (the kernel lets go of it
/// asynchronously after `losetup -d`).
pub fn loop_holds_file(dev: &str) -> bool {
    let name = dev.trim_start_matches("/dev/");
    std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).is_ok()
}

//! Every run of e2fsprogs a conversion makes, in one place: `mkfs.ext4 -d` for a layer made
//! whole, `debugfs -w -f` for a layer applied in place and for the filesystem's identity. Each
//! runs at the fixed time conversions use (`E2FSPROGS_FAKE_TIME`) with the constant UUID seed
//! ([`FS_SEED`]), so the same tree gives the same bytes; each reports failure with what the
//! tool said, never a silent partial filesystem.

use std::fs::File;
use std::io;
use std::path::Path;

use super::{bad, ext4times, workdir};
use crate::cli::CliResult;

/// UUID every converted filesystem is made with, and its directory hash seed. ext4 seeds every
/// metadata checksum (inodes, directory blocks, bitmaps, extent blocks) with the UUID it was
/// made with, and orders large directories by the hash seed, so one constant for both makes the
/// same files give the same metadata blocks in any image — which cross-image dedup needs
/// (FORMAT.md §1.7). `metadata_csum_seed` keeps that seed when the filesystem then gets its own
/// UUID (derived from its base layer) in the superblock.
pub(super) const FS_SEED: &str = "6c736d2d-6673-4d00-8000-000000000001";

/// Makes the filesystem's times a function of the image (`ext4times`: change and access
/// times = the modification time the layer gave each inode, the root's times fixed) and gives
/// the filesystem its own UUID (see [`FS_SEED`]) with one `debugfs` command.
pub(super) fn normalize_times(raw: &Path, uuid: &str) -> CliResult {
    {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(raw)?;
        ext4times::normalize(&f).map_err(|e| bad(e.to_string()))?;
    }
    run_script(
        raw,
        &format!("ssv uuid {uuid}\n"),
        "debugfs",
        "debugfs setting the UUID",
    )
    .map_err(|e| bad(e.to_string()))?;
    Ok(())
}

/// Makes `raw` (`size` bytes, recreated) the ext4 filesystem of the whole tree `root`, with
/// `mkfs.ext4 -d`: for the bottom layer, and for a layer that cannot be applied in place (see
/// `ext4apply`).
pub(super) fn make_whole_fs(
    root: &Path,
    raw: &Path,
    size: u64,
    uuid: &str,
    digest: &str,
) -> CliResult {
    {
        let _step = workdir::step()?;
        let _ = std::fs::remove_file(raw);
        File::create(raw)?.set_len(size)?;
    }
    let o = workdir::output(
        std::process::Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-b",
                "4096",
                "-U",
                FS_SEED,
                "-O",
                "metadata_csum_seed",
            ])
            .arg("-E")
            .arg(format!("hash_seed={FS_SEED},lazy_itable_init=0,nodiscard"))
            .arg("-d")
            .arg(root)
            .arg(raw)
            .env("E2FSPROGS_FAKE_TIME", "1"),
    )
    .map_err(|e| bad(format!("mkfs.ext4: {e}")))?;
    if !o.status.success() {
        return Err(bad(format!(
            "mkfs.ext4 for layer {digest}: {} (is --size {size} too small?)",
            String::from_utf8_lossy(&o.stderr).trim()
        )));
    }
    normalize_times(raw, uuid)
}

/// Runs `script` with `debugfs -w -f` on the filesystem `raw` at the fixed time conversions use
/// (the script is kept beside `raw` with extension `ext`). debugfs reports a failed command on
/// stderr and goes on with exit status 0, so any line but its banner is an error, named `what`.
pub fn run_script(raw: &Path, script: &str, ext: &str, what: &str) -> io::Result<()> {
    run_script_tracked(raw, script, ext, what, None)
}

/// [`run_script`], with debugfs keeping the undo file `undo` (`-z`) when given.
pub(super) fn run_script_tracked(
    raw: &Path,
    script: &str,
    ext: &str,
    what: &str,
    undo: Option<&Path>,
) -> io::Result<()> {
    let f = raw.with_extension(ext);
    {
        let _step = workdir::step()?;
        std::fs::write(&f, script)?;
    }
    let mut cmd = std::process::Command::new("debugfs");
    cmd.arg("-w");
    if let Some(u) = undo {
        cmd.arg("-z").arg(u);
    }
    let o = workdir::output(
        cmd.arg("-f")
            .arg(&f)
            .arg(raw)
            .env("E2FSPROGS_FAKE_TIME", "1"),
    )?;
    let errors: Vec<&str> = std::str::from_utf8(&o.stderr)
        .unwrap_or("(unreadable debugfs output)")
        .lines()
        .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
        .collect();
    if !o.status.success() || !errors.is_empty() {
        return Err(io::Error::other(format!("{what}: {}", errors.join("; "))));
    }
    Ok(())
}

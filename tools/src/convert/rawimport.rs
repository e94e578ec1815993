//! Importing the raw filesystem of one layer as a layer blob that stores only the 4 KiB
//! blocks that differ from the layer below, without reading the layers below back.
//!
//! [`BlockHashes`] remembers a SHA-256 (truncated to 128 bits) of every 4 KiB block of the raw
//! image as it was after the previous layer; importing the next layer hashes its blocks and
//! stores those whose hash changed (a block now zero becomes a zero extent). This stores
//! exactly the blocks `blockfmt::commit::import_raw` finds by decompressing and comparing
//! against the stack below, for the cost of hashing from the page cache. Holes in the raw
//! file (`SEEK_DATA`/`SEEK_HOLE`) are never read. Hashing and chunk compression run on every
//! core ([`HostThreads`], lent to blockfmt's writer, which starts no threads of its own); the
//! blob is byte-identical to a sequential import.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use blockfmt::writer::ZERO_GRANULE;
use blockfmt::{Dictionary, LayerWriter, WriterOptions, WrittenLayer, ZeroPolicy};
use sha2::{Digest, Sha256};

const BLOCK: u64 = ZERO_GRANULE;
const STEP: u64 = 4 << 20;

type Hash = [u8; 16];
const ZERO: Hash = [0; 16];

/// The sha256 of a 4 KiB block; `None` for a zero block.
fn full_hash(b: &[u8]) -> Option<[u8; 32]> {
    (!blockfmt::writer::is_zero(b)).then(|| Sha256::digest(b).into())
}

/// What [`BlockHashes`] keeps of a block's [`full_hash`]: its first 128 bits, never [`ZERO`]
/// for a block that is not zero.
fn short(full: &Option<[u8; 32]>) -> Hash {
    let Some(d) = full else { return ZERO };
    let mut h = [0u8; 16];
    h.copy_from_slice(&d[..16]);
    if h == ZERO {
        h[0] = 1; // never confused with a zero block
    }
    h
}

fn hash(b: &[u8]) -> Hash {
    short(&full_hash(b))
}

/// Threads lent to blockfmt for encoding chunks at once: each batch runs on up to one thread
/// per core, the caller's included.
pub struct HostThreads(usize);

impl HostThreads {
    pub fn new() -> HostThreads {
        HostThreads(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

impl blockfmt::ParallelLoads for HostThreads {
    fn run_all(&self, tasks: Vec<blockfmt::LoadTask>) {
        let workers = self.0.min(tasks.len());
        let queue = std::sync::Mutex::new(tasks.into_iter());
        let next = || queue.lock().ok().and_then(|mut q| q.next());
        std::thread::scope(|sc| {
            for _ in 1..workers {
                sc.spawn(|| {
                    while let Some(t) = next() {
                        t();
                    }
                });
            }
            while let Some(t) = next() {
                t();
            }
        });
    }
}

/// The hashes of every 4 KiB block of `buf`, on every core.
fn hash_all(buf: &[u8], threads: usize) -> Vec<Option<[u8; 32]>> {
    if threads <= 1 {
        return buf.chunks(BLOCK as usize).map(full_hash).collect();
    }
    let blocks = buf.len().div_ceil(BLOCK as usize);
    let per = blocks.div_ceil(threads.max(1)).max(1) * BLOCK as usize;
    let mut out = vec![None; blocks];
    std::thread::scope(|sc| {
        for (piece, hashes) in buf.chunks(per).zip(out.chunks_mut(per / BLOCK as usize)) {
            sc.spawn(move || {
                for (b, h) in piece.chunks(BLOCK as usize).zip(hashes.iter_mut()) {
                    *h = full_hash(b);
                }
            });
        }
    });
    out
}

/// The block hashes of the raw image as the layers converted so far left it.
#[derive(Clone)]
pub struct BlockHashes(Vec<Hash>);

impl BlockHashes {
    /// An all-zero disk of `size` bytes (before the bottom layer).
    pub fn zeros(size: u64) -> BlockHashes {
        BlockHashes(vec![ZERO; size.div_ceil(BLOCK) as usize])
    }
}

fn raw_io(offset: u64, source: io::Error) -> blockfmt::Error {
    blockfmt::Error::Io {
        layer: "raw image".into(),
        offset,
        source,
    }
}

/// Where data starts at or after `off` (`None`: only a hole to the end).
fn seek(f: &File, off: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: lseek on an open descriptor we own; no memory is passed.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// Which blocks of the raw image may differ from [`BlockHashes`].
pub enum Scan {
    /// Any block: every data region of the file is read and hashed (after `mkfs`, or when no
    /// list of written blocks is at hand). Costs the image.
    Whole,
    /// Only these runs of 4 KiB blocks (`(first, count)`, sorted, not overlapping): the
    /// blocks an in-place apply wrote (`e2undo`); every other block is known unchanged.
    /// Costs the layer. Gives the same blob as `Whole` when the list holds every block
    /// written since the hashes were taken.
    Written(Vec<(u64, u64)>),
}

/// Writes the blocks of `raw` (`size` bytes) that differ from `hashes` (then updated) as a
/// layer, looking at the blocks `scan` names; `bottom` layers leave holes for zeros, upper
/// ones zero extents.
#[allow(clippy::too_many_arguments)]
pub fn import_changed<W: io::Write>(
    raw: &File,
    size: u64,
    hashes: &mut BlockHashes,
    bottom: bool,
    dict: Option<Arc<Dictionary>>,
    out: W,
    mut opts: WriterOptions,
    scan: &Scan,
    mut progress: impl FnMut(u64),
) -> blockfmt::Result<(WrittenLayer, W)> {
    opts.zeros = if bottom {
        ZeroPolicy::Hole
    } else {
        ZeroPolicy::Extent
    };
    let mut w = LayerWriter::new(out, size, opts)?;
    w.collect_block_hashes(); // for the hash index and the dictionary of the layers above
    if let Some(d) = dict {
        w.set_dictionary(d);
    }
    let threads = HostThreads::new();
    let cores = threads.0;
    w.set_parallel(Arc::new(threads), 4 * cores);
    // The raw image is read and hashed on other threads while this one writes what changed.
    std::thread::scope(|sc| {
        let (to, from) = std::sync::mpsc::sync_channel(2);
        let reader = sc.spawn(move || read_pieces(raw, size, scan, cores, &to));
        let written = from
            .iter()
            .try_for_each(|p| write_piece(&mut w, hashes, p, &mut progress));
        drop(from); // (a reader still sending stops)
        let read = reader
            .join()
            .map_err(|_| raw_io(0, io::Error::other("the raw image reader panicked")))?;
        written.and(read)
    })?;
    progress(size);
    w.finish()
}

/// One piece of the raw image, in disk order: a hole (zeros), or data with the hashes of its
/// blocks.
enum Piece {
    Hole {
        from: u64,
        to: u64,
    },
    Data {
        off: u64,
        buf: Vec<u8>,
        hashes: Vec<Option<[u8; 32]>>,
    },
}

/// Sends the pieces of `raw` that `scan` names, in disk order, to `to` (stops early, without
/// an error, when the receiver hangs up).
fn read_pieces(
    raw: &File,
    size: u64,
    scan: &Scan,
    cores: usize,
    to: &std::sync::mpsc::SyncSender<Piece>,
) -> blockfmt::Result<()> {
    match scan {
        Scan::Whole => {
            let mut off = 0u64;
            while off < size {
                let data = seek(raw, off, libc::SEEK_DATA)
                    .map_err(|e| raw_io(off, e))?
                    .unwrap_or(size)
                    .min(size)
                    / BLOCK
                    * BLOCK;
                // A hole: zeros now; a block that held data before becomes a zero extent.
                if data > off
                    && to
                        .send(Piece::Hole {
                            from: off,
                            to: data,
                        })
                        .is_err()
                {
                    return Ok(());
                }
                off = data.max(off);
                if off >= size {
                    break;
                }
                let end = seek(raw, off, libc::SEEK_HOLE)
                    .map_err(|e| raw_io(off, e))?
                    .unwrap_or(size)
                    .min(size)
                    .div_ceil(BLOCK)
                    * BLOCK;
                let end = end.min(size).max(off + BLOCK.min(size - off));
                if !read_range(raw, off, end, cores, to)? {
                    return Ok(());
                }
                off = end;
            }
        }
        Scan::Written(runs) => {
            for &(first, count) in runs {
                let from = first.saturating_mul(BLOCK).min(size);
                let end = first.saturating_add(count).saturating_mul(BLOCK).min(size);
                if !read_range(raw, from, end, cores, to)? {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

/// Reads `[off, to)` of `raw` in steps and sends each with its block hashes; whether the
/// receiver still listens.
fn read_range(
    raw: &File,
    mut off: u64,
    to: u64,
    cores: usize,
    send: &std::sync::mpsc::SyncSender<Piece>,
) -> blockfmt::Result<bool> {
    while off < to {
        let n = (to - off).min(STEP) as usize;
        let mut buf = vec![0u8; n];
        raw.read_exact_at(&mut buf, off)
            .map_err(|e| raw_io(off, e))?;
        // Threads pay off only for many blocks (small runs are most of a small layer's).
        let hashes = hash_all(&buf, if n >= 64 * BLOCK as usize { cores } else { 1 });
        if send.send(Piece::Data { off, buf, hashes }).is_err() {
            return Ok(false);
        }
        off += n as u64;
    }
    Ok(true)
}

/// Writes the blocks of `piece` whose hash differs from `hashes` (then updated): a block now
/// zero becomes zeros (a zero extent over layers, nothing in a bottom layer).
fn write_piece<W: io::Write>(
    w: &mut LayerWriter<W>,
    hashes: &mut BlockHashes,
    piece: Piece,
    progress: &mut impl FnMut(u64),
) -> blockfmt::Result<()> {
    let (off, buf, fresh) = match piece {
        Piece::Hole { from, to } => return zero_range(w, hashes, from, to),
        Piece::Data { off, buf, hashes } => (off, buf, hashes),
    };
    for (i, (b, full)) in buf.chunks(BLOCK as usize).zip(fresh).enumerate() {
        let at = off + i as u64 * BLOCK;
        let h = short(&full);
        let slot = hashes
            .0
            .get_mut((at / BLOCK) as usize)
            .ok_or_else(|| raw_io(at, io::Error::other("block past the disk")))?;
        if h != *slot {
            *slot = h;
            match full {
                Some(d) => w.write_block_hashed(at, b, d)?,
                None => w.write_data(at, b)?,
            }
        }
    }
    progress(off + buf.len() as u64);
    Ok(())
}

fn zero_range<W: io::Write>(
    w: &mut LayerWriter<W>,
    hashes: &mut BlockHashes,
    from: u64,
    to: u64,
) -> blockfmt::Result<()> {
    let mut at = from;
    while at < to {
        let slot = &mut hashes.0[(at / BLOCK) as usize];
        let n = BLOCK.min(to - at);
        if *slot != ZERO {
            *slot = ZERO;
            w.write_zeroes(at, n)?;
        }
        at += n;
    }
    Ok(())
}

/// Writes `image` (`size` bytes) into the empty sparse file `raw` (zero blocks stay holes) and
/// returns its block hashes: the raw filesystem of layers that were reused, not converted.
pub fn export(image: &blockfmt::Image, raw: &File, size: u64) -> blockfmt::Result<BlockHashes> {
    let mut hashes = BlockHashes::zeros(size);
    let mut buf = vec![0u8; STEP as usize];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(STEP) as usize;
        image.read(off, &mut buf[..n])?;
        for (i, b) in buf[..n].chunks(BLOCK as usize).enumerate() {
            let at = off + i as u64 * BLOCK;
            let h = hash(b);
            if h != ZERO {
                raw.write_all_at(b, at).map_err(|e| raw_io(at, e))?;
            }
            hashes.0[(at / BLOCK) as usize] = h;
        }
        off += n as u64;
    }
    Ok(hashes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::Command;

    fn import(raw: &Path, hashes: &mut BlockHashes, bottom: bool, scan: &Scan) -> Vec<u8> {
        let f = File::open(raw).unwrap();
        let size = f.metadata().unwrap().len();
        let (_, out) = import_changed(
            &f,
            size,
            hashes,
            bottom,
            None,
            Vec::new(),
            WriterOptions::default(),
            scan,
            |_| {},
        )
        .unwrap();
        out
    }

    /// A layer applied in place with an undo file is the same filesystem as without one, and
    /// hashing only the blocks the undo file names gives the same blob as hashing them all.
    #[test]
    fn written_scan_gives_the_same_blob_as_whole_scan() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("etc/d")).unwrap();
        for i in 0..50 {
            std::fs::write(root.join(format!("etc/f{i}")), vec![i as u8 + 1; 5000 * i]).unwrap();
        }
        let a = t.path().join("a.raw");
        File::create(&a).unwrap().set_len(64 << 20).unwrap();
        let ok = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096", "-E", "nodiscard", "-d"])
            .arg(&root)
            .arg(&a)
            .env("E2FSPROGS_FAKE_TIME", "1")
            .status()
            .unwrap();
        assert!(ok.success());
        let rw = std::fs::OpenOptions::new().read(true).write(true).open(&a);
        super::super::ext4times::normalize(&rw.unwrap()).unwrap();
        let mut h = BlockHashes::zeros(64 << 20);
        let bottom = import(&a, &mut h, true, &Scan::Whole);
        assert!(!bottom.is_empty());
        let b = t.path().join("b.raw");
        std::fs::copy(&a, &b).unwrap();

        let data = t.path().join("data");
        std::fs::write(&data, vec![9u8; 200_000]).unwrap();
        let xattr = t.path().join("xattr");
        std::fs::write(&xattr, b"v").unwrap();
        let script = format!(
            "write {0} new\nmkdir /etc/e\nwrite {0} /etc/e/g\nrm /etc/f3\nrm /etc/f40\n\
             sif /etc/f7 mode 0100600\nea_set -f {1} /etc/f8 user.k\nsif /etc mtime @7\n",
            data.display(),
            xattr.display()
        );
        super::super::e2fs::run_script(&a, &script, "s1", "plain").unwrap();
        let undo = t.path().join("b.undo");
        super::super::e2fs::run_script_tracked(&b, &script, "s2", "tracked", Some(&undo)).unwrap();
        assert!(
            std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
            "the undo file changed the filesystem"
        );
        let runs =
            super::super::e2undo::written_blocks(&File::open(&undo).unwrap(), BLOCK).unwrap();
        let named: u64 = runs.iter().map(|r| r.1).sum();
        assert!(named > 0 && named < 1000, "{named}");

        let whole = import(&a, &mut h.clone(), false, &Scan::Whole);
        let written = import(&b, &mut h.clone(), false, &Scan::Written(runs));
        assert!(whole == written, "the two scans wrote different blobs");
    }
}

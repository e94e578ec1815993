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

fn hash(b: &[u8]) -> Hash {
    if blockfmt::writer::is_zero(b) {
        return ZERO;
    }
    let d = Sha256::digest(b);
    let mut h = [0u8; 16];
    h.copy_from_slice(&d[..16]);
    if h == ZERO {
        h[0] = 1; // never confused with a zero block
    }
    h
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
fn hash_all(buf: &[u8], threads: usize) -> Vec<Hash> {
    let blocks = buf.len().div_ceil(BLOCK as usize);
    let per = blocks.div_ceil(threads.max(1)).max(1) * BLOCK as usize;
    let mut out = vec![ZERO; blocks];
    std::thread::scope(|sc| {
        for (piece, hashes) in buf.chunks(per).zip(out.chunks_mut(per / BLOCK as usize)) {
            sc.spawn(move || {
                for (b, h) in piece.chunks(BLOCK as usize).zip(hashes.iter_mut()) {
                    *h = hash(b);
                }
            });
        }
    });
    out
}

/// The block hashes of the raw image as the layers converted so far left it.
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

/// Writes the blocks of `raw` (`size` bytes) that differ from `hashes` (then updated) as a
/// layer; `bottom` layers leave holes for zeros, upper ones zero extents.
#[allow(clippy::too_many_arguments)]
pub fn import_changed<W: io::Write>(
    raw: &File,
    size: u64,
    hashes: &mut BlockHashes,
    bottom: bool,
    dict: Option<Arc<Dictionary>>,
    out: W,
    mut opts: WriterOptions,
    mut progress: impl FnMut(u64),
) -> blockfmt::Result<(WrittenLayer, W)> {
    let io_err = raw_io;
    opts.zeros = if bottom {
        ZeroPolicy::Hole
    } else {
        ZeroPolicy::Extent
    };
    let mut w = LayerWriter::new(out, size, opts)?;
    if let Some(d) = dict {
        w.set_dictionary(d);
    }
    let threads = HostThreads::new();
    let cores = threads.0;
    w.set_parallel(Arc::new(threads), 4 * cores);
    let mut buf = vec![0u8; STEP as usize];
    let mut off = 0u64;
    while off < size {
        let data = seek(raw, off, libc::SEEK_DATA)
            .map_err(|e| io_err(off, e))?
            .unwrap_or(size)
            .min(size)
            / BLOCK
            * BLOCK;
        // A hole: zeros now; a block that held data before becomes a zero extent.
        zero_range(&mut w, hashes, off, data)?;
        off = data.max(off);
        if off >= size {
            break;
        }
        let end = seek(raw, off, libc::SEEK_HOLE)
            .map_err(|e| io_err(off, e))?
            .unwrap_or(size)
            .min(size)
            .div_ceil(BLOCK)
            * BLOCK;
        let end = end.min(size).max(off + BLOCK.min(size - off));
        while off < end {
            let n = (end - off).min(STEP) as usize;
            raw.read_exact_at(&mut buf[..n], off)
                .map_err(|e| io_err(off, e))?;
            let fresh = hash_all(&buf[..n], cores);
            for (i, (b, h)) in buf[..n].chunks(BLOCK as usize).zip(fresh).enumerate() {
                let at = off + i as u64 * BLOCK;
                let slot = &mut hashes.0[(at / BLOCK) as usize];
                if h != *slot {
                    *slot = h;
                    w.write_data(at, b)?;
                }
            }
            off += n as u64;
            progress(off);
        }
    }
    progress(size);
    w.finish()
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

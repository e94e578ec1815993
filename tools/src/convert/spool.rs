//! The source layers, each read once: its compressed bytes hashed (checked against its digest)
//! as they are decompressed into a private spool beside the destination, with the hash of the
//! decompressed bytes (its diff ID: it names the content whatever its compression) and its
//! size. Layers are independent, so they are spooled on every core at once (gunzip is one core
//! per stream); the results are the same as one after another.
//!
//! Guarantee kept: every layer is checked against its digest before anything is converted or
//! published; a layer that does not match is an error naming it ("does not match its digest"),
//! also when its corruption makes the decompressor fail first.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{bad, blob_path, workdir};
use crate::cli::CliResult;
use crate::oci;

/// The spooled layers (see the module docs); the directory is removed when dropped.
pub(super) struct Spool {
    tree: workdir::WorkTree,
    pub diff_ids: Vec<sha2::digest::Output<Sha256>>,
    /// The total decompressed size of the layers.
    pub unpacked: u64,
}

impl Spool {
    /// Layer `i`'s decompressed tar.
    pub fn tar(&self, i: usize) -> PathBuf {
        tar_in(self.tree.path(), i)
    }
}

fn tar_in(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("{i}.tar"))
}

/// A reader that hashes what it reads.
struct HashingReader<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// A copy of one layer's decompressed bytes, streamed to a consumer while the layer is
/// spooled (the bottom layer's tar, applied to the host tree meanwhile, `mod.rs`): buffers in
/// order, then an empty buffer for the end. Unchecked bytes: the consumer must not use what
/// it made of them unless the spool then succeeds. Stops (dropped, so the consumer sees the
/// stream cut) past `limit` bytes; a consumer that hangs up stops it too, the spool goes on.
pub(super) struct Tee {
    pub to: std::sync::mpsc::SyncSender<Vec<u8>>,
    pub limit: u64,
}

/// A writer that hashes what it writes to `file`, and copies it to a [`Tee`] if it has one.
struct HashingWriter<W> {
    file: W,
    hash: Sha256,
    tee: Option<Tee>,
    teed: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.file.write_all(b)?;
        self.hash.update(b);
        if let Some(t) = self.tee.as_ref().filter(|_| !b.is_empty()) {
            self.teed += b.len() as u64;
            if self.teed > t.limit || t.to.send(b.to_vec()).is_err() {
                self.tee = None;
            }
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Reads what a [`Tee`] sends: its bytes up to the end marker; an error if the stream was cut
/// (the spool failed or went past the tee's limit).
pub(super) struct TeeReader {
    from: std::sync::mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
    ended: bool,
}

impl TeeReader {
    pub fn new(from: std::sync::mpsc::Receiver<Vec<u8>>) -> TeeReader {
        TeeReader {
            from,
            buf: Vec::new(),
            pos: 0,
            ended: false,
        }
    }
}

impl Read for TeeReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.ended {
                return Ok(0);
            }
            match self.from.recv() {
                Ok(b) if b.is_empty() => self.ended = true,
                Ok(b) => (self.buf, self.pos) = (b, 0),
                Err(_) => return Err(io::Error::other("the layer's stream was cut")),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Copies `r` to `w` in large pieces (each piece is one message of a [`Tee`]).
fn copy_large(r: &mut dyn Read, w: &mut impl Write) -> io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match r.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if filled == 0 {
            return Ok(total);
        }
        w.write_all(&buf[..filled])?;
        total += filled as u64;
    }
}

/// The decompressed bytes of `r`, as `media_type` says.
fn decoder<'a, R: BufRead + 'a>(r: R, media_type: &str) -> io::Result<Box<dyn Read + 'a>> {
    Ok(if media_type.ends_with("gzip") {
        Box::new(flate2::bufread::MultiGzDecoder::new(r))
    } else if media_type.ends_with("zstd") {
        Box::new(zstd::stream::read::Decoder::with_buffer(r)?)
    } else if media_type.ends_with("tar") {
        Box::new(r)
    } else {
        return Err(io::Error::other(format!(
            "unsupported layer media type {media_type}"
        )));
    })
}

/// Spools one layer into `out`: its diff ID and decompressed size. The whole blob is hashed
/// (bytes after the compressed stream too) and checked before the result counts.
fn spool_one(
    src: &Path,
    l: &oci::Descriptor,
    out: &Path,
    tee: Option<Tee>,
) -> CliResult<(sha2::digest::Output<Sha256>, u64)> {
    let digest = &l.digest;
    let p = blob_path(src, digest)?;
    let f = File::open(&p).map_err(|e| bad(format!("layer {digest}: {}: {e}", p.display())))?;
    let mut blob = BufReader::with_capacity(
        1 << 20,
        HashingReader {
            inner: f,
            hash: Sha256::new(),
        },
    );
    let mut tar = HashingWriter {
        file: io::BufWriter::with_capacity(
            1 << 20,
            File::create(out).map_err(|e| bad(format!("spool: {e}")))?,
        ),
        hash: Sha256::new(),
        tee,
        teed: 0,
    };
    let copied = decoder(&mut blob, &l.media_type)
        .and_then(|mut r| copy_large(&mut r, &mut tar))
        .map_err(|e| format!("layer {digest}: {e}"));
    // The rest of the blob (a decoder that failed stopped early): the digest covers it all.
    let drained = io::copy(&mut blob, &mut io::sink());
    let read = format!("sha256:{}", hex::encode(blob.into_inner().hash.finalize()));
    if drained.is_ok() && read != *digest {
        return Err(bad(format!(
            "layer {digest}: content does not match its digest (corrupt or truncated)"
        )));
    }
    drained.map_err(|e| bad(format!("layer {digest}: {e}")))?;
    let n = copied.map_err(|e| bad(format!("{e} (corrupt or truncated)")))?;
    let HashingWriter {
        file, hash, tee, ..
    } = tar;
    file.into_inner().map_err(|e| bad(format!("spool: {e}")))?;
    if let Some(t) = tee {
        let _ = t.to.send(Vec::new()); // the end: the whole layer was sent
    }
    Ok((hash.finalize(), n))
}

/// Checks every source layer against its digest before anything is converted, and spools it
/// (a private directory named after `dst`, beside it). Layers go on every core at once; the
/// first failing layer (bottom first) is the error. `tee` gets a copy of the bottom layer.
pub(super) fn spool_layers(
    src: &Path,
    dst: &Path,
    layers: &[oci::Descriptor],
    tee: Option<Tee>,
) -> CliResult<Spool> {
    let tree = {
        let mut name = dst.file_name().unwrap_or_default().to_os_string();
        name.push(".lsm-spool");
        let spool = dst.with_file_name(name);
        if let Some(up) = spool.parent().filter(|u| !u.as_os_str().is_empty()) {
            std::fs::create_dir_all(up).map_err(|e| bad(format!("{}: {e}", up.display())))?;
        }
        workdir::WorkTree::create(&spool).map_err(|e| bad(format!("spool: {e}")))?
    };
    let dir = tree.path().to_path_buf();
    let results = std::sync::Mutex::new((0..layers.len()).map(|_| None).collect::<Vec<_>>());
    let queue = std::sync::Mutex::new(0usize);
    let tee = std::sync::Mutex::new(tee);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|sc| {
        for _ in 0..cores.min(layers.len()) {
            sc.spawn(|| loop {
                let i = {
                    let Ok(mut q) = queue.lock() else { return };
                    let i = *q;
                    *q += 1;
                    i
                };
                let Some(l) = layers.get(i) else { return };
                let _t = super::timing::stage(|| format!("layer {}: spool", i + 1));
                let tee = if i == 0 {
                    tee.lock().ok().and_then(|mut t| t.take())
                } else {
                    None
                };
                let r = spool_one(src, l, &tar_in(&dir, i), tee);
                if let Ok(mut v) = results.lock() {
                    v[i] = Some(r);
                }
            });
        }
    });
    let mut spool = Spool {
        tree,
        diff_ids: Vec::with_capacity(layers.len()),
        unpacked: 0,
    };
    let results = results
        .into_inner()
        .map_err(|_| bad("internal error: a spooling thread panicked"))?;
    for r in results {
        let (diff_id, n) = r.ok_or_else(|| bad("internal error: a layer was not spooled"))??;
        spool.diff_ids.push(diff_id);
        spool.unpacked += n;
    }
    Ok(spool)
}

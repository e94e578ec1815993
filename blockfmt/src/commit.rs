//! Sealing writable state into immutable layers, and importing raw disk images. All of these
//! feed a `LayerWriter` in logical order, so their output is deterministic.

use std::io::{Read, Write};
use std::sync::Arc;

use crate::dictionary::Dictionary;
use crate::error::{Error, Result};
use crate::image::{Alloc, Image};
use crate::upper::{UpperLayer, UpperTarget};
use crate::writer::{LayerWriter, WriterOptions, WrittenLayer, ZeroPolicy, ZERO_GRANULE};

/// Bytes moved per step when copying data into a writer.
const STEP: u64 = 1 << 20;

/// Feeds `[start, start + len)` to the writer in `STEP` pieces, each filled by `read(offset, buf)`.
fn copy_range<W: Write>(
    w: &mut LayerWriter<W>,
    buf: &mut Vec<u8>,
    start: u64,
    len: u64,
    mut read: impl FnMut(u64, &mut [u8]) -> Result<()>,
) -> Result<()> {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(STEP);
        buf.resize(n as usize, 0);
        read(start + done, buf)?;
        w.write_data(start + done, buf)?;
        done += n;
    }
    Ok(())
}

/// Seals an upper layer into a layer blob meant to sit on top of the layers it was written
/// over: written data becomes data extents, zeros and trims become zero extents.
pub fn commit_upper<W: Write>(
    upper: &UpperLayer,
    out: W,
    mut opts: WriterOptions,
) -> Result<(WrittenLayer, W)> {
    opts.zeros = ZeroPolicy::Extent;
    let mut w = LayerWriter::new(out, upper.logical_size(), opts)?;
    let mut buf = Vec::new();
    let view = upper.ranges();
    for &(start, len, t) in &view.pieces {
        match t {
            UpperTarget::Data { file_offset } => {
                copy_range(&mut w, &mut buf, start, len, |off, b| {
                    view.read_data(file_offset + (off - start), b)
                })?
            }
            UpperTarget::Zero | UpperTarget::Trimmed => w.write_zeroes(start, len)?,
        }
    }
    w.finish()
}

/// Squashes the whole image (every layer and the upper layer) into one bottom layer: what
/// reads as zeros becomes a hole.
pub fn squash<W: Write>(
    image: &Image,
    out: W,
    mut opts: WriterOptions,
) -> Result<(WrittenLayer, W)> {
    opts.zeros = ZeroPolicy::Hole;
    let mut w = LayerWriter::new(out, image.size(), opts)?;
    let mut buf = Vec::new();
    for (start, len, a) in image.map(0, image.size())? {
        if a != Alloc::Data {
            continue;
        }
        copy_range(&mut w, &mut buf, start, len, |off, b| image.read(off, b))?;
    }
    w.finish()
}

/// Imports a raw disk image of `size` bytes read from `src`.
///
/// Without `base`, the result is a bottom layer: zero granules become holes. With `base`, the
/// result is a layer to stack on `base` holding only the 4 KiB granules whose content differs
/// from `base` (changed-to-zero granules become zero extents), so `base` + layer reads as `src`.
/// With `dict`, blocks a dictionary layer already stores are borrowed, not stored.
#[allow(clippy::too_many_arguments)]
pub fn import_raw<R: Read, W: Write>(
    mut src: R,
    size: u64,
    base: Option<&Image>,
    dict: Option<Arc<Dictionary>>,
    out: W,
    mut opts: WriterOptions,
    mut progress: impl FnMut(u64),
) -> Result<(WrittenLayer, W)> {
    if let Some(b) = base {
        if b.size() != size {
            return Err(Error::Invalid(format!(
                "the raw image is {size} bytes, the base image {} bytes",
                b.size()
            )));
        }
    }
    opts.zeros = if base.is_some() {
        ZeroPolicy::Extent
    } else {
        ZeroPolicy::Hole
    };
    let mut w = LayerWriter::new(out, size, opts)?;
    if let Some(d) = dict {
        w.set_dictionary(d);
    }
    let mut buf = vec![0u8; STEP as usize];
    let mut old = vec![0u8; STEP as usize];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(STEP) as usize;
        src.read_exact(&mut buf[..n])
            .map_err(|e| Error::io("raw image", off, e))?;
        match base {
            None => w.write_data(off, &buf[..n])?,
            Some(b) => {
                b.read(off, &mut old[..n])?;
                let g = ZERO_GRANULE as usize;
                let mut i = 0;
                while i < n {
                    let j = (i + g).min(n);
                    if buf[i..j] != old[i..j] {
                        w.write_data(off + i as u64, &buf[i..j])?;
                    }
                    i = j;
                }
            }
        }
        off += n as u64;
        progress(off);
    }
    w.finish()
}

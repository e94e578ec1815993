//! An image: a read-only stack of layers with an optional writable upper layer on top. This is
//! the one object frontends and tools talk to: read, write, zeroes, trim, flush, and a map of
//! what is allocated (for sparse copies and NBD block status).

use crate::error::{Error, Result};
use crate::merged::Target;
use crate::stack::LayerStack;
use crate::upper::{UpperLayer, UpperTarget};

/// Allocation state of a range, as block-status queries report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alloc {
    /// Holds data.
    Data,
    /// Reads as zeros because something recorded zeros (a zero extent, WRITE_ZEROES, TRIM).
    Zero,
    /// Nothing anywhere in the stack: reads as zeros.
    Hole,
}

/// A layer stack plus an optional upper layer.
pub struct Image {
    lower: LayerStack,
    upper: Option<UpperLayer>,
    /// Writes allowed: an upper layer, not opened as a read-only view.
    writable: bool,
}

impl Image {
    /// Puts `upper` (if any) over `lower`; both must be for the same disk size.
    pub fn new(lower: LayerStack, upper: Option<UpperLayer>) -> Result<Image> {
        if let Some(u) = &upper {
            if u.logical_size() != lower.size() {
                return Err(Error::Invalid(format!(
                    "upper layer {} is for a {} byte disk, the image is {} bytes",
                    u.dir().display(),
                    u.logical_size(),
                    lower.size()
                )));
            }
        }
        let writable = upper.is_some();
        Ok(Image {
            lower,
            upper,
            writable,
        })
    }

    /// The same image, refusing writes: reads still see what the upper layer holds.
    pub fn read_only_view(mut self) -> Image {
        self.writable = false;
        self
    }

    /// Disk size.
    pub fn size(&self) -> u64 {
        self.lower.size()
    }
    /// The immutable layers.
    pub fn lower(&self) -> &LayerStack {
        &self.lower
    }
    /// The upper layer, if writable.
    pub fn upper(&self) -> Option<&UpperLayer> {
        self.upper.as_ref()
    }
    /// True without an upper layer, or when opened as a read-only view.
    pub fn read_only(&self) -> bool {
        !self.writable
    }

    fn upper_or_ro(&self) -> Result<&UpperLayer> {
        self.upper
            .as_ref()
            .filter(|_| self.writable)
            .ok_or(Error::ReadOnly)
    }

    /// Reads `buf.len()` bytes at `off`.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        self.prefetch_lower(off, len);
        self.walk(off, len, Some(buf), false, &mut |_, _, _| {})
            .map(|_| ())
    }

    /// Reads `buf.len()` bytes at `off` and returns, from the same lookups, the allocation map
    /// of the range (what [`Self::map`] would say), so a sparse reply describes exactly the
    /// bytes it carries. With `cached_only`, returns `Ok(None)` (`buf` partly written) instead
    /// of decoding a chunk the decoded-chunk cache does not hold: a frontend serves hot reads
    /// on its own thread and hands the rest to threads that may block.
    pub fn read_sparse(
        &self,
        off: u64,
        buf: &mut [u8],
        cached_only: bool,
    ) -> Result<Option<Vec<(u64, u64, Alloc)>>> {
        let mut out = Vec::new();
        let len = buf.len() as u64;
        if !cached_only {
            self.prefetch_lower(off, len);
        }
        let done = self.walk(off, len, Some(buf), cached_only, &mut merge_into(&mut out))?;
        Ok(done.then_some(out))
    }

    /// A read longer than one granule may need several cold chunks: load them in parallel
    /// first (a range the upper layer covers may load a chunk it did not need; cheap next to
    /// a round trip per chunk).
    fn prefetch_lower(&self, off: u64, len: u64) {
        if len > crate::format::ZERO_GRANULE && self.lower.check_range(off, len).is_ok() {
            self.lower.load_range(off, len);
        }
    }

    /// The one walk behind reads and maps: upper pieces, then lower segments under the gaps;
    /// `push` hears every piece in order; with `buf`, data is read into it as well.
    /// `Ok(false)`: stopped at an uncached chunk (`cached_only`).
    fn walk(
        &self,
        off: u64,
        len: u64,
        mut buf: Option<&mut [u8]>,
        cached_only: bool,
        push: &mut dyn FnMut(u64, u64, Alloc),
    ) -> Result<bool> {
        self.lower.check_range(off, len)?;
        let lower =
            |s: u64, l: u64, mut dst: Option<&mut [u8]>, push: &mut dyn FnMut(u64, u64, Alloc)| {
                for seg in self.lower.index().segments(s, l) {
                    if let Some(dst) = dst.as_deref_mut() {
                        let at = (seg.offset - s) as usize;
                        let d = &mut dst[at..at + seg.len as usize];
                        if !self.lower.read_segment_from(&seg, d, cached_only)? {
                            return Ok(false);
                        }
                    }
                    let a = match seg.target {
                        Target::Hole => Alloc::Hole,
                        Target::Zero { .. } => Alloc::Zero,
                        Target::Data { .. } => Alloc::Data,
                    };
                    push(seg.offset, seg.len, a);
                }
                Ok::<bool, Error>(true)
            };
        let Some(up) = &self.upper else {
            return lower(off, len, buf, push);
        };
        let view = up.pieces(off, len);
        let reading = buf.is_some();
        let mut data_pieces = 0;
        for &(s, l, t) in &view.pieces {
            let dst = buf
                .as_deref_mut()
                .map(|b| &mut b[(s - off) as usize..(s - off + l) as usize]);
            match t {
                Some(UpperTarget::Data { file_offset }) => {
                    if let Some(dst) = dst {
                        view.read_data(file_offset, dst)?;
                    }
                    data_pieces += 1;
                    push(s, l, Alloc::Data);
                }
                Some(UpperTarget::Zero | UpperTarget::Trimmed) => {
                    if let Some(dst) = dst {
                        dst.fill(0);
                    }
                    push(s, l, Alloc::Zero);
                }
                None => {
                    if !lower(s, l, dst, push)? {
                        return Ok(false);
                    }
                }
            }
        }
        // A finished read over many upper pieces: a rewrite may make the next one a single
        // `pread` (see `upper/defrag.rs`).
        if reading && self.writable {
            up.note_read(off, len, data_pieces);
        }
        Ok(true)
    }

    /// Writes `data` at `off` into the upper layer.
    pub fn write(&self, off: u64, data: &[u8]) -> Result<()> {
        self.lower.check_range(off, data.len() as u64)?;
        self.upper_or_ro()?.write(off, data)
    }

    /// Records zeros over a range.
    pub fn write_zeroes(&self, off: u64, len: u64) -> Result<()> {
        self.lower.check_range(off, len)?;
        self.upper_or_ro()?.write_zeroes(off, len, false)
    }

    /// Records a discard over a range (reads as zeros afterwards).
    pub fn trim(&self, off: u64, len: u64) -> Result<()> {
        self.lower.check_range(off, len)?;
        self.upper_or_ro()?.write_zeroes(off, len, true)
    }

    /// Makes every acknowledged write durable (no-op when read-only).
    pub fn flush(&self) -> Result<()> {
        match &self.upper {
            Some(u) if self.writable => u.flush(),
            _ => Ok(()),
        }
    }

    /// Hands buffered upper-layer bookkeeping to the kernel (see [`UpperLayer::settle`]); for
    /// frontends going idle.
    pub fn settle(&self) -> Result<()> {
        match &self.upper {
            Some(u) => u.settle(),
            None => Ok(()),
        }
    }

    /// Allocation map of `[off, off + len)`, adjacent pieces of one state merged.
    pub fn map(&self, off: u64, len: u64) -> Result<Vec<(u64, u64, Alloc)>> {
        let mut out = Vec::new();
        self.walk(off, len, None, false, &mut merge_into(&mut out))?;
        Ok(out)
    }
}

/// A `push` for [`Image::walk`] that merges adjacent pieces of one state into `out`.
fn merge_into(out: &mut Vec<(u64, u64, Alloc)>) -> impl FnMut(u64, u64, Alloc) + '_ {
    |s, l, a| match out.last_mut() {
        Some(p) if p.2 == a && p.0 + p.1 == s => p.1 += l,
        _ => out.push((s, l, a)),
    }
}

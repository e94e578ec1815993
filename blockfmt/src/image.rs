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
        Ok(Image { lower, upper })
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
    /// True without an upper layer.
    pub fn read_only(&self) -> bool {
        self.upper.is_none()
    }

    fn upper_or_ro(&self) -> Result<&UpperLayer> {
        self.upper.as_ref().ok_or(Error::ReadOnly)
    }

    /// Reads `buf.len()` bytes at `off`.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.lower.check_range(off, buf.len() as u64)?;
        let Some(up) = &self.upper else {
            return self.lower.read(off, buf);
        };
        for (s, l, t) in up.pieces(off, buf.len() as u64) {
            let dst = &mut buf[(s - off) as usize..(s - off + l) as usize];
            match t {
                Some(UpperTarget::Data { file_offset }) => up.read_data(file_offset, dst)?,
                Some(UpperTarget::Zero | UpperTarget::Trimmed) => dst.fill(0),
                None => self.lower.read(s, dst)?,
            }
        }
        Ok(())
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
            Some(u) => u.flush(),
            None => Ok(()),
        }
    }

    /// Allocation map of `[off, off + len)`, adjacent pieces of one state merged.
    pub fn map(&self, off: u64, len: u64) -> Result<Vec<(u64, u64, Alloc)>> {
        self.lower.check_range(off, len)?;
        let mut out: Vec<(u64, u64, Alloc)> = Vec::new();
        let mut push = |s: u64, l: u64, a: Alloc| match out.last_mut() {
            Some(p) if p.2 == a && p.0 + p.1 == s => p.1 += l,
            _ => out.push((s, l, a)),
        };
        let lower = |s: u64, l: u64, push: &mut dyn FnMut(u64, u64, Alloc)| {
            for seg in self.lower.index().segments(s, l) {
                let a = match seg.target {
                    Target::Hole => Alloc::Hole,
                    Target::Zero { .. } => Alloc::Zero,
                    Target::Data { .. } => Alloc::Data,
                };
                push(seg.offset, seg.len, a);
            }
        };
        match &self.upper {
            None => lower(off, len, &mut push),
            Some(up) => {
                for (s, l, t) in up.pieces(off, len) {
                    match t {
                        Some(UpperTarget::Data { .. }) => push(s, l, Alloc::Data),
                        Some(_) => push(s, l, Alloc::Zero),
                        None => lower(s, l, &mut push),
                    }
                }
            }
        }
        Ok(out)
    }
}

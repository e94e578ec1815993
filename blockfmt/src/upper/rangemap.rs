//! The upper layer's in-memory map: sorted, non-overlapping ranges, each pointing at bytes in the
//! data file or recorded as zeros. A new range replaces whatever it overlaps, splitting the
//! pieces at its edges, so the map always says what the latest write put at each byte.

use std::collections::BTreeMap;

/// What an upper-layer range holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpperTarget {
    /// Bytes at this offset of the data file.
    Data { file_offset: u64 },
    /// Zeros from WRITE_ZEROES (or a write of zeros).
    Zero,
    /// Zeros from TRIM/discard.
    Trimmed,
}

impl UpperTarget {
    /// The same target `d` bytes further into its range.
    pub(crate) fn advance(self, d: u64) -> UpperTarget {
        match self {
            UpperTarget::Data { file_offset } => UpperTarget::Data {
                file_offset: file_offset + d,
            },
            t => t,
        }
    }
}

/// Sorted non-overlapping ranges: start → (len, target).
#[derive(Debug, Clone, Default)]
pub struct RangeMap {
    map: BTreeMap<u64, (u64, UpperTarget)>,
    /// Bytes of the disk that map to data (what compaction must keep).
    data_bytes: u64,
}

impl RangeMap {
    /// The data-file offset of `[off, off + len)` when one data range holds all of it.
    pub fn data_at(&self, off: u64, len: u64) -> Option<u64> {
        let (&s, &(l, t)) = self.map.range(..=off).next_back()?;
        match t {
            UpperTarget::Data { file_offset } if off + len <= s + l => Some(file_offset + off - s),
            _ => None,
        }
    }

    /// Records `[start, start + len)` as `t`, replacing what it covers.
    pub fn insert(&mut self, start: u64, len: u64, t: UpperTarget) {
        if len == 0 {
            return;
        }
        let end = start + len;
        let is_data = |t: UpperTarget| matches!(t, UpperTarget::Data { .. });
        if is_data(t) {
            self.data_bytes += len;
        }
        if let Some((&ps, &(pl, pt))) = self.map.range(..start).next_back() {
            let pe = ps + pl;
            if pe > start {
                if is_data(pt) {
                    self.data_bytes -= pe.min(end) - start;
                }
                self.map.insert(ps, (start - ps, pt));
                if pe > end {
                    self.map.insert(end, (pe - end, pt.advance(end - ps)));
                }
            }
        }
        let inside: Vec<u64> = self.map.range(start..end).map(|(&k, _)| k).collect();
        for k in inside {
            if let Some((l, t0)) = self.map.remove(&k) {
                if is_data(t0) {
                    self.data_bytes -= (k + l).min(end) - k;
                }
                if k + l > end {
                    self.map.insert(end, (k + l - end, t0.advance(end - k)));
                }
            }
        }
        // Extend the previous range instead of adding one when the new one continues it.
        if let Some((&ps, &mut (ref mut pl, pt))) = self.map.range_mut(..start).next_back() {
            if ps + *pl == start {
                let continues = match (pt, t) {
                    (
                        UpperTarget::Data { file_offset: a },
                        UpperTarget::Data { file_offset: b },
                    ) => a + *pl == b,
                    (a, b) => a == b,
                };
                if continues {
                    *pl += len;
                    return;
                }
            }
        }
        self.map.insert(start, (len, t));
    }

    /// Pieces of `[off, off + len)`, in order, with `None` for bytes the map does not cover.
    pub fn pieces(&self, off: u64, len: u64) -> Vec<(u64, u64, Option<UpperTarget>)> {
        let end = off + len;
        let mut out = Vec::new();
        let mut pos = off;
        let first = self
            .map
            .range(..=off)
            .next_back()
            .map(|(&k, _)| k)
            .unwrap_or(off);
        for (&s, &(l, t)) in self.map.range(first..end) {
            let e = s + l;
            if e <= pos {
                continue;
            }
            if s > pos {
                out.push((pos, s - pos, None));
                pos = s;
            }
            let pe = e.min(end);
            out.push((pos, pe - pos, Some(t.advance(pos - s))));
            pos = pe;
        }
        if pos < end {
            out.push((pos, end - pos, None));
        }
        out
    }

    /// Every range, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, UpperTarget)> + '_ {
        self.map.iter().map(|(&s, &(l, t))| (s, l, t))
    }

    /// Bytes of the disk whose latest write is data in the data file (live data).
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when nothing was written.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn matches_per_byte_model(ops in proptest::collection::vec((0u64..300, 1u64..60, 0u8..3), 1..40)) {
            let mut m = RangeMap::default();
            let mut model: Vec<Option<(u8, u64)>> = vec![None; 400];
            let mut file = 0u64;
            for (s, l, k) in ops {
                let t = match k { 0 => UpperTarget::Data { file_offset: file }, 1 => UpperTarget::Zero, _ => UpperTarget::Trimmed };
                m.insert(s, l, t);
                for b in s..s + l {
                    model[b as usize] = Some((k, if k == 0 { file + b - s } else { 0 }));
                }
                if k == 0 { file += l; }
            }
            let pieces = m.pieces(0, 400);
            let mut pos = 0;
            for (s, l, t) in pieces {
                prop_assert_eq!(s, pos);
                for b in s..s + l {
                    let got = t.map(|t| match t {
                        UpperTarget::Data { file_offset } => (0, file_offset + b - s),
                        UpperTarget::Zero => (1, 0),
                        UpperTarget::Trimmed => (2, 0),
                    });
                    prop_assert_eq!(got, model[b as usize]);
                }
                pos += l;
            }
            prop_assert_eq!(pos, 400);
            let live = model.iter().filter(|b| matches!(b, Some((0, _)))).count() as u64;
            prop_assert_eq!(m.data_bytes(), live);
        }
    }
}

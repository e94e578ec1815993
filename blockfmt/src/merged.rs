//! The merged view of a stack of immutable layers: one sorted, non-overlapping array built once
//! at open, in which the topmost layer covering a byte wins. Lookups are a binary search over a
//! separate array of starts (FORMAT.md §2: 24 bytes per extent).

use crate::error::{Error, Result};
use crate::format::{Extent, ExtentKind};

/// Where one merged extent's bytes come from (16 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub len: u32,
    pub chunk: u32,
    pub chunk_offset: u32,
    /// Layer number in the stack, 0 = bottom.
    pub layer: u16,
    pub kind: ExtentKind,
}

impl Mapping {
    /// The same mapping with its first `d` bytes cut off.
    fn advance(self, d: u64) -> Mapping {
        let d = d as u32;
        Mapping {
            len: self.len - d,
            chunk_offset: if self.kind == ExtentKind::Data {
                self.chunk_offset + d
            } else {
                0
            },
            ..self
        }
    }
    fn truncate(self, len: u64) -> Mapping {
        Mapping {
            len: len as u32,
            ..self
        }
    }
}

/// What a piece of the disk reads as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// No layer covers it: reads as zeros.
    Hole,
    /// A zero extent of `layer`.
    Zero { layer: u16 },
    /// Bytes `chunk_offset..` of chunk `chunk` of `layer`.
    Data {
        layer: u16,
        chunk: u32,
        chunk_offset: u32,
    },
}

/// A contiguous piece of a request with one target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub len: u64,
    pub target: Target,
}

/// The merged index; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct MergedIndex {
    starts: Vec<u64>,
    maps: Vec<Mapping>,
    /// Bucket directory: `buckets[b]` = number of extents starting before `b << shift`. About
    /// one bucket per extent, so a lookup reads one bucket pair and searches a handful of
    /// starts instead of walking log2(E) cache lines (FORMAT.md §2).
    buckets: Vec<u32>,
    shift: u32,
}

impl MergedIndex {
    /// Folds layers' extent lists, bottom first, into one index. Each list must be sorted and
    /// non-overlapping (as `Metadata::decode` guarantees).
    pub fn build(layers: &[&[Extent]]) -> Result<MergedIndex> {
        if layers.len() > u16::MAX as usize {
            return Err(Error::Invalid(format!(
                "{} layers is more than {}",
                layers.len(),
                u16::MAX
            )));
        }
        let mut cur: Vec<(u64, Mapping)> = Vec::new();
        for (n, extents) in layers.iter().enumerate() {
            let upper = extents.iter().map(|e| {
                (
                    e.logical,
                    Mapping {
                        len: e.len,
                        chunk: e.chunk,
                        chunk_offset: e.chunk_offset,
                        layer: n as u16,
                        kind: e.kind,
                    },
                )
            });
            cur = if cur.is_empty() {
                upper.collect()
            } else {
                overlay(&cur, upper)
            };
        }
        if cur.len() >= u32::MAX as usize {
            return Err(Error::Invalid(format!(
                "{} merged extents is too many",
                cur.len()
            )));
        }
        let (starts, maps): (Vec<u64>, Vec<Mapping>) = cur.into_iter().unzip();
        let (buckets, shift) = bucket_directory(&starts);
        Ok(MergedIndex {
            starts,
            maps,
            buckets,
            shift,
        })
    }

    /// Index of the last extent starting at or before `off`, plus one (0 = none).
    #[inline]
    fn rank(&self, off: u64) -> usize {
        let b = (off >> self.shift) as usize;
        let (lo, hi) = match (self.buckets.get(b), self.buckets.get(b + 1)) {
            (Some(&lo), Some(&hi)) => (lo as usize, hi as usize),
            (Some(&lo), None) => (lo as usize, self.starts.len()),
            _ => return self.starts.len(),
        };
        lo + self.starts[lo..hi].partition_point(|&s| s <= off)
    }

    /// Number of merged extents.
    pub fn len(&self) -> usize {
        self.starts.len()
    }

    /// True when no layer has any extent.
    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// The extent containing byte `off`, as (its start, its mapping).
    #[inline]
    pub fn lookup(&self, off: u64) -> Option<(u64, Mapping)> {
        let i = self.rank(off).checked_sub(1)?;
        let (s, m) = (self.starts[i], self.maps[i]);
        (off < s + m.len as u64).then_some((s, m))
    }

    /// Cuts `[off, off + len)` into segments with one target each, holes included, in order.
    pub fn segments(&self, off: u64, len: u64) -> Vec<Segment> {
        let mut out = Vec::new();
        let end = off + len;
        let mut pos = off;
        let mut i = self.rank(off).saturating_sub(1);
        while pos < end {
            let Some((&s, m)) = self.starts.get(i).zip(self.maps.get(i)) else {
                out.push(Segment {
                    offset: pos,
                    len: end - pos,
                    target: Target::Hole,
                });
                break;
            };
            let e = s + m.len as u64;
            if e <= pos {
                i += 1;
                continue;
            }
            if s > pos {
                let hole_end = s.min(end);
                out.push(Segment {
                    offset: pos,
                    len: hole_end - pos,
                    target: Target::Hole,
                });
                pos = hole_end;
                continue;
            }
            let seg_end = e.min(end);
            let skip = (pos - s) as u32;
            let target = match m.kind {
                ExtentKind::Zero => Target::Zero { layer: m.layer },
                ExtentKind::Data => Target::Data {
                    layer: m.layer,
                    chunk: m.chunk,
                    chunk_offset: m.chunk_offset + skip,
                },
            };
            out.push(Segment {
                offset: pos,
                len: seg_end - pos,
                target,
            });
            pos = seg_end;
            i += 1;
        }
        out
    }
}

/// Builds the bucket directory for sorted `starts`: a power-of-two bucket width (≥ 4 KiB) giving
/// about one bucket per extent.
fn bucket_directory(starts: &[u64]) -> (Vec<u32>, u32) {
    let Some(&last) = starts.last() else {
        return (Vec::new(), 63);
    };
    let span = last.max(1);
    let per = (span / starts.len() as u64).max(1);
    let shift = (64 - per.leading_zeros()).clamp(12, 63);
    let n = (last >> shift) as usize + 1;
    let mut buckets = Vec::with_capacity(n);
    let mut i = 0usize;
    for b in 0..n as u64 {
        let edge = b << shift;
        while i < starts.len() && starts[i] < edge {
            i += 1;
        }
        buckets.push(i as u32);
    }
    (buckets, shift)
}

/// Lays `upper` over `lower` (both sorted, non-overlapping): upper pieces replace whatever lower
/// pieces they cover, lower pieces are clipped at the edges. Linear in the sum of lengths.
fn overlay(
    lower: &[(u64, Mapping)],
    upper: impl Iterator<Item = (u64, Mapping)>,
) -> Vec<(u64, Mapping)> {
    let mut out = Vec::with_capacity(lower.len());
    let mut rest = lower.iter().copied();
    let mut carry: Option<(u64, Mapping)> = None;
    for (us, um) in upper {
        let ue = us + um.len as u64;
        while let Some((s, m)) = carry.take().or_else(|| rest.next()) {
            let e = s + m.len as u64;
            if e <= us {
                out.push((s, m));
                continue;
            }
            if s < us {
                out.push((s, m.truncate(us - s)));
            }
            if e > ue {
                let ns = s.max(ue);
                carry = Some((ns, m.advance(ns - s)));
                break;
            }
        }
        out.push((us, um));
    }
    out.extend(carry);
    out.extend(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::NO_CHUNK;
    use proptest::prelude::*;

    /// Reference model: per-byte owner of a small disk.
    fn model(layers: &[Vec<Extent>], size: u64) -> Vec<Option<(u16, ExtentKind, u32, u32)>> {
        let mut v = vec![None; size as usize];
        for (n, l) in layers.iter().enumerate() {
            for e in l {
                for b in e.logical..e.end() {
                    let d = (b - e.logical) as u32;
                    v[b as usize] = Some((
                        n as u16,
                        e.kind,
                        e.chunk,
                        if e.kind == ExtentKind::Data {
                            e.chunk_offset + d
                        } else {
                            0
                        },
                    ));
                }
            }
        }
        v
    }

    fn arb_layer(size: u64) -> impl Strategy<Value = Vec<Extent>> {
        proptest::collection::vec((0..size, 1u32..40, any::<bool>(), 0u32..5), 0..12).prop_map(
            move |mut v| {
                v.sort_by_key(|x| x.0);
                let mut out: Vec<Extent> = Vec::new();
                let mut next = 0;
                for (s, l, zero, c) in v {
                    let s = s.max(next);
                    let l = (l as u64).min(size.saturating_sub(s)) as u32;
                    if l == 0 {
                        continue;
                    }
                    out.push(Extent {
                        logical: s,
                        len: l,
                        kind: if zero {
                            ExtentKind::Zero
                        } else {
                            ExtentKind::Data
                        },
                        chunk: if zero { NO_CHUNK } else { c },
                        chunk_offset: if zero { 0 } else { c * 100 },
                    });
                    next = s + l as u64;
                }
                out
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn bucket_rank_equals_binary_search(mut starts in proptest::collection::vec(0u64..(1 << 40), 1..300), probes in proptest::collection::vec(0u64..(1 << 41), 50)) {
            starts.sort_unstable();
            starts.dedup();
            let maps = vec![Mapping { len: 1, chunk: 0, chunk_offset: 0, layer: 0, kind: ExtentKind::Zero }; starts.len()];
            let (buckets, shift) = bucket_directory(&starts);
            let idx = MergedIndex { starts: starts.clone(), maps, buckets, shift };
            for p in probes.into_iter().chain(starts.iter().copied()).chain(starts.iter().map(|s| s.saturating_sub(1))) {
                prop_assert_eq!(idx.rank(p), starts.partition_point(|&s| s <= p));
            }
        }

        #[test]
        fn merged_matches_per_byte_model(layers in proptest::collection::vec(arb_layer(200), 1..6)) {
            let refs: Vec<&[Extent]> = layers.iter().map(|l| l.as_slice()).collect();
            let idx = MergedIndex::build(&refs).unwrap();
            let want = model(&layers, 200);
            for w in idx.starts.windows(2) { prop_assert!(w[0] < w[1]); }
            for (b, w) in want.iter().enumerate() {
                let got = idx.lookup(b as u64).map(|(s, m)| {
                    let d = b as u32 - s as u32;
                    (m.layer, m.kind, m.chunk, if m.kind == ExtentKind::Data { m.chunk_offset + d } else { 0 })
                });
                prop_assert_eq!(got, *w, "byte {}", b);
            }
            let segs = idx.segments(3, 190);
            let mut pos = 3;
            for s in &segs {
                prop_assert_eq!(s.offset, pos);
                pos += s.len;
                let t = match want[s.offset as usize] {
                    None => Target::Hole,
                    Some((layer, ExtentKind::Zero, _, _)) => Target::Zero { layer },
                    Some((layer, ExtentKind::Data, chunk, chunk_offset)) => Target::Data { layer, chunk, chunk_offset },
                };
                prop_assert_eq!(s.target, t);
            }
            prop_assert_eq!(pos, 193);
        }
    }
}

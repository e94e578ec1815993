//! Shared inputs for the benchmarks: a deterministic sample of real files, so figures compare
//! like with like across runs and against `zstd -b` on the same bytes.

use std::path::{Path, PathBuf};

/// Concatenates regular files under `/usr/share` (sorted walk) up to `limit` bytes.
pub fn real_sample(limit: usize) -> Vec<u8> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        let mut v: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        v.sort();
        for p in v {
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => walk(&p, out),
                Ok(m) if m.is_file() => out.push(p),
                _ => {}
            }
        }
    }
    let mut files = Vec::new();
    walk(Path::new("/usr/share"), &mut files);
    let mut out = Vec::with_capacity(limit);
    for f in files {
        if out.len() >= limit {
            break;
        }
        if let Ok(b) = std::fs::read(&f) {
            out.extend_from_slice(&b[..b.len().min(limit - out.len())]);
        }
    }
    out
}

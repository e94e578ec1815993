//! The reuse database of `lsmctl convert --batch` (and of every conversion unless
//! `--no-reuse`): a converted layer is found again by the key of what decided its bytes (its
//! source chain, the disk size, the layer settings, the dictionary), so a base layer shared by
//! many images is converted once. An entry is the layer's manifest descriptor (JSON) and a hard
//! link to its blob; entries are written atomically, and a missing or unreadable one is a miss,
//! never an error (the database only saves work).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{blob_path, link_or_copy, FsKind};
use crate::oci::Descriptor;

/// The key of a converted layer: its source chain (diff IDs of it and every layer under it),
/// the disk size and the layer settings — what decides the converted bytes.
pub(super) fn chain_key(
    diff_ids: &[impl AsRef<[u8]>],
    size: u64,
    opts: &blockfmt::WriterOptions,
    dict: &[String],
    fs: FsKind,
) -> String {
    let mut h = Sha256::new();
    // v9: images carry a hash-index blob (FORMAT.md §8).
    h.update(b"lsm-convert-v9\0");
    if fs == FsKind::Erofs {
        h.update(b"erofs-flat\0");
    }
    h.update(size.to_le_bytes());
    h.update(format!("{:?}/{:?}", opts.chunk_size, opts.compression).as_bytes());
    // A dictionary changes what is stored (not what is read): its blobs are part of the key.
    for d in dict {
        h.update(b"dict\0");
        h.update(d.as_bytes());
    }
    for d in diff_ids {
        h.update(d.as_ref());
    }
    hex::encode(h.finalize())
}

pub(super) fn default_db() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .map(|c| c.join("lsm/convert"))
}

/// Converted layers by chain key: `chains/<key>.json` (the layer's descriptor) and the blob in
/// `blobs/sha256/`. Written atomically; a missing or unreadable entry is a miss.
pub(super) struct ReuseDb {
    pub dir: PathBuf,
}

impl ReuseDb {
    pub fn lookup(&self, key: &str) -> Option<(Descriptor, PathBuf)> {
        let desc: Descriptor = serde_json::from_slice(
            &std::fs::read(self.dir.join("chains").join(format!("{key}.json"))).ok()?,
        )
        .ok()?;
        let blob = blob_path(&self.dir, &desc.digest).ok()?;
        blob.exists().then_some((desc, blob))
    }

    /// Remembers a converted layer (failures only cost a future conversion).
    pub fn record(&self, key: &str, desc: &Descriptor, blob: &Path) {
        let r = (|| -> std::io::Result<()> {
            let blobs = self.dir.join("blobs/sha256");
            std::fs::create_dir_all(&blobs)?;
            std::fs::create_dir_all(self.dir.join("chains"))?;
            let name = blob
                .file_name()
                .ok_or_else(|| std::io::Error::other("blob name"))?;
            link_or_copy(blob, &blobs.join(name)).map_err(|e| std::io::Error::other(e.0))?;
            let tmp = self.dir.join("chains").join(format!(".{key}.tmp"));
            std::fs::write(&tmp, serde_json::to_vec(desc)?)?;
            std::fs::rename(&tmp, self.dir.join("chains").join(format!("{key}.json")))
        })();
        if let Err(e) = r {
            eprintln!(
                "convert: warning: cannot record a conversion in {}: {e}",
                self.dir.display()
            );
        }
    }
}

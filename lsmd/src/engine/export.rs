//! An export: one named image and its counters, shared by every frontend that serves it (NBD
//! connections, a kernel nbd device, a ublk device, a FUSE file), and the set of exports a
//! server offers.

use std::collections::BTreeMap;
use std::sync::Arc;

use blockfmt::Image;

use crate::metrics::{ExportStats, Frontend};

/// One named export, shared by every frontend that serves it (NBD connections, a kernel nbd
/// device, a ublk device, a FUSE file).
pub struct Export {
    pub name: String,
    pub image: Arc<Image>,
    /// Flushes and failures seen by the frontends, for `/metrics`.
    pub stats: ExportStats,
}

impl Export {
    pub fn new(name: String, image: Arc<Image>) -> Export {
        if let Some(up) = image.upper() {
            // Compaction copies on a thread of its own (see `compact_if_asked`), beside writes.
            up.set_background_compaction(true);
        }
        Export {
            name,
            image,
            stats: ExportStats::default(),
        }
    }

    /// A FLUSH (or the flush after a FUA write) asked for through `via`: syncs the image and
    /// counts it. Every frontend flushes through here, so `/metrics` shows which ones reach lsmd.
    /// The caller reports an error to its client and to [`Export::failed_request`].
    pub fn flush(&self, via: Frontend) -> blockfmt::Result<()> {
        let r = self.image.flush();
        self.stats.count_flush(via, r.is_ok());
        self.compact_if_asked();
        r
    }

    /// Starts the upper layer's reclaim (a checkpoint or a compaction) on a thread of its own
    /// when a write or flush found it due, so no request waits for the syncs or the copy (the layer holds its lock only for the last,
    /// small round). One thread per compaction: compactions are rare and each runs for seconds.
    pub fn compact_if_asked(&self) {
        let Some(up) = self.image.upper() else {
            return;
        };
        if !up.take_compaction_request() {
            return;
        }
        let (image, name) = (self.image.clone(), self.name.clone());
        let run = move || {
            if let Some(Err(e)) = image.upper().map(|up| up.reclaim()) {
                // The layer logged it and is unchanged, or failed (sticky, seen by requests).
                tracing::debug!(export = %name, error = %e, "upper layer compaction ended");
            }
        };
        let spawned = std::thread::Builder::new()
            .name("upper-compact".into())
            .spawn(run);
        if let Err(e) = spawned {
            tracing::warn!(export = %self.name, error = %e,
                "cannot start a compaction thread; compacting on the request's thread");
            if let Err(e) = up.reclaim() {
                tracing::debug!(export = %self.name, error = %e, "upper layer compaction ended");
            }
        }
    }

    /// Starts the upper layer's defragmenting rewrites on a thread of its own when reads
    /// queued fragmented ranges (see `blockfmt/src/upper/defrag.rs`): a large read over many
    /// small upper pieces costs a `pread` per piece until its range is rewritten as one. One
    /// thread per burst (the layer asks again only once a burst found its queue empty), so at
    /// most one runs per export; no read waits for it.
    pub fn defrag_if_asked(&self) {
        let Some(up) = self.image.upper() else {
            return;
        };
        if !up.take_defrag_request() {
            return;
        }
        let (image, name) = (self.image.clone(), self.name.clone());
        let run = move || match image.run_defrags() {
            Ok(r) => tracing::debug!(export = %name, ranges = r.ranges, bytes = r.bytes,
                skipped = r.skipped, "upper layer ranges defragmented"),
            // Out of space, a failed layer (sticky, seen by requests) or a lower layer that
            // could not be read: the rest of the burst is dropped, reads stay correct.
            Err(e) => tracing::debug!(export = %name, error = %e, "upper layer defrag ended"),
        };
        let spawned = std::thread::Builder::new()
            .name("upper-defrag".into())
            .spawn(run);
        if let Err(e) = spawned {
            // Never on the request's thread: a burst may rewrite megabytes.
            tracing::warn!(export = %self.name, error = %e,
                "cannot start a defrag thread; dropping the queued ranges");
            up.cancel_defrags();
        }
    }

    /// Notes a request that failed with `e`: an upper layer out of space is counted, and one
    /// that refuses writes after a failed sync ([`blockfmt::Error::Failed`], sticky until the
    /// layer is reopened) is logged at error level (once) and raises `lsm_upper_failed`.
    pub fn failed_request(&self, e: &blockfmt::Error) {
        if e.is_no_space() {
            self.stats.count_no_space();
        }
        if matches!(e, blockfmt::Error::Failed { .. }) && self.stats.mark_failed() {
            tracing::error!(export = %self.name, error = %e, "the upper layer failed: every write and flush of this export fails (EIO) until lsmd is restarted and the layer recovered");
        }
    }
}

/// The set of exports a server offers; the first is the default (empty name).
#[derive(Clone)]
pub struct Exports {
    by_name: Arc<BTreeMap<String, Arc<Export>>>,
    default: Option<String>,
}

impl Exports {
    /// Exports in order; the first answers to the empty name.
    pub fn new(list: Vec<Export>) -> Exports {
        let default = list.first().map(|e| e.name.clone());
        Exports {
            by_name: Arc::new(
                list.into_iter()
                    .map(|e| (e.name.clone(), Arc::new(e)))
                    .collect(),
            ),
            default,
        }
    }

    /// The export called `name` (the empty name: the default export).
    pub fn find(&self, name: &str) -> Option<Arc<Export>> {
        let key = if name.is_empty() {
            self.default.as_deref()?
        } else {
            name
        };
        self.by_name.get(key).cloned()
    }

    /// Every export's name and image, in name order.
    pub fn images(&self) -> impl Iterator<Item = (&str, &Image)> {
        self.by_name
            .values()
            .map(|e| (e.name.as_str(), e.image.as_ref()))
    }

    /// Every export's name, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// Every export, in name order.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Export>> {
        self.by_name.values()
    }

    /// Every export's name and a shared handle to its image, in name order.
    pub fn images_shared(&self) -> impl Iterator<Item = (&str, Arc<Image>)> {
        self.by_name
            .values()
            .map(|e| (e.name.as_str(), e.image.clone()))
    }

    /// Flushes every writable image (graceful shutdown).
    pub fn flush_all(&self) -> Vec<(String, blockfmt::Error)> {
        self.by_name
            .values()
            .filter_map(|e| {
                let err = e.flush(Frontend::Shutdown).err()?;
                e.failed_request(&err);
                Some((e.name.clone(), err))
            })
            .collect()
    }
}

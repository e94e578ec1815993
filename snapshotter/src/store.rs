//! Snapshot metadata in an embedded `redb` database (`ROOT/metadata.redb`).
//!
//! Layout: table `snapshots` maps a snapshot's key (containerd's name for it) to a JSON
//! [`Record`]; table `counters` holds `next_id`, the number the next snapshot directory
//! (`ROOT/snapshots/<id>`) gets. Ids are never reused, so a directory left by a crash can never
//! be mistaken for a later snapshot's.
//!
//! Crash safety comes from the order of operations in the callers (see `snapshots.rs`): a
//! snapshot's directory is made complete under `ROOT/staging/` and renamed into place *before*
//! the transaction that records it commits, and removed only *after* the transaction that
//! forgets it commits. A crash between the two leaves only a directory with no record, which
//! [`Store::orphan_dirs`] finds and the startup sweep deletes; the database itself is
//! transactional (redb commits are atomic and durable), so no half-written record exists.
//!
//! Concurrency: redb allows one write transaction at a time and blocks others; the service
//! holds one mutex over every mutation anyway (see `snapshots.rs`), so this module assumes a
//! single writer and does no locking of its own.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const NEXT_ID: &str = "next_id";

/// What a snapshot is, as containerd names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// Writable; `Commit` turns it into a `Committed` one.
    Active,
    /// Read-only view of a committed parent.
    View,
    /// Immutable; may be the parent of others.
    Committed,
}

/// One snapshot's metadata.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// Directory number: the snapshot lives in `ROOT/snapshots/<id>`.
    pub id: u64,
    pub kind: Kind,
    /// Key of the parent snapshot (committed), or empty.
    pub parent: String,
    pub labels: HashMap<String, String>,
    /// Seconds.nanoseconds since the Unix epoch.
    pub created_at: (u64, u32),
    pub updated_at: (u64, u32),
    /// Disk usage measured at commit (committed snapshots only): (bytes, inodes).
    #[serde(default)]
    pub usage: Option<(i64, i64)>,
    /// An lsm snapshot: a remote layer, a committed container layer, or a disk over them.
    #[serde(default)]
    pub lsm: Option<crate::lsm::LsmState>,
}

/// A store error, naming the operation and the key it was about.
#[derive(Debug, thiserror::Error)]
#[error("metadata store ({path}): {op}: {source}")]
pub struct StoreError {
    pub path: String,
    pub op: String,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// The open database.
pub struct Store {
    db: Database,
    path: String,
}

/// Current time as stored in records.
pub fn now() -> (u64, u32) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    (d.as_secs(), d.subsec_nanos())
}

/// A stored time back as a `SystemTime`.
pub fn to_system_time(t: (u64, u32)) -> SystemTime {
    UNIX_EPOCH + Duration::new(t.0, t.1)
}

/// A write transaction: look up and change records, then [`Txn::commit`]; dropping it without
/// committing discards every change.
pub struct Txn<'a> {
    txn: redb::WriteTransaction,
    store: &'a Store,
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let shown = path.display().to_string();
        let db = Database::create(path).map_err(|e| err(&shown, "open", e))?;
        let store = Store { db, path: shown };
        // Make sure both tables exist, so read transactions never meet a missing table.
        let txn = store.begin()?;
        txn.commit()?;
        Ok(store)
    }

    /// Starts a write transaction.
    pub fn begin(&self) -> Result<Txn<'_>, StoreError> {
        let txn = self
            .db
            .begin_write()
            .map_err(|e| err(&self.path, "begin", e))?;
        {
            txn.open_table(SNAPSHOTS)
                .map_err(|e| err(&self.path, "open table snapshots", e))?;
            txn.open_table(COUNTERS)
                .map_err(|e| err(&self.path, "open table counters", e))?;
        }
        Ok(Txn { txn, store: self })
    }

    /// The record of `key`, if any.
    pub fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        let op = format!("read {key:?}");
        let txn = self.db.begin_read().map_err(|e| err(&self.path, &op, e))?;
        let table = txn
            .open_table(SNAPSHOTS)
            .map_err(|e| err(&self.path, &op, e))?;
        let value = table.get(key).map_err(|e| err(&self.path, &op, e))?;
        match value {
            None => Ok(None),
            Some(v) => decode(&self.path, key, v.value()).map(Some),
        }
    }

    /// Every (key, record), in key order.
    pub fn all(&self) -> Result<Vec<(String, Record)>, StoreError> {
        let op = "list";
        let txn = self.db.begin_read().map_err(|e| err(&self.path, op, e))?;
        let table = txn
            .open_table(SNAPSHOTS)
            .map_err(|e| err(&self.path, op, e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| err(&self.path, op, e))? {
            let (k, v) = entry.map_err(|e| err(&self.path, op, e))?;
            let key = k.value().to_string();
            let rec = decode(&self.path, &key, v.value())?;
            out.push((key, rec));
        }
        Ok(out)
    }

    /// Snapshot directory ids present under `dir` that no record names: left by a crash
    /// between making a directory and recording it, or between forgetting and deleting it.
    pub fn orphan_dirs(&self, dir: &Path) -> Result<Vec<String>, StoreError> {
        let known: std::collections::HashSet<String> = self
            .all()?
            .into_iter()
            .map(|(_, r)| r.id.to_string())
            .collect();
        let entries = std::fs::read_dir(dir).map_err(|e| err(&self.path, "scan snapshots", e))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| err(&self.path, "scan snapshots", e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !known.contains(&name) {
                out.push(name);
            }
        }
        Ok(out)
    }
}

impl Txn<'_> {
    /// The record of `key`, if any, as this transaction sees it.
    pub fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        let op = format!("read {key:?}");
        let table = self
            .txn
            .open_table(SNAPSHOTS)
            .map_err(|e| err(&self.store.path, &op, e))?;
        let value = table.get(key).map_err(|e| err(&self.store.path, &op, e))?;
        match value {
            None => Ok(None),
            Some(v) => decode(&self.store.path, key, v.value()).map(Some),
        }
    }

    /// Whether any record names `key` as its parent.
    pub fn has_children(&self, key: &str) -> Result<bool, StoreError> {
        let op = format!("children of {key:?}");
        let table = self
            .txn
            .open_table(SNAPSHOTS)
            .map_err(|e| err(&self.store.path, &op, e))?;
        for entry in table.iter().map_err(|e| err(&self.store.path, &op, e))? {
            let (k, v) = entry.map_err(|e| err(&self.store.path, &op, e))?;
            if decode(&self.store.path, k.value(), v.value())?.parent == key {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Writes (inserts or replaces) the record of `key`.
    pub fn put(&self, key: &str, rec: &Record) -> Result<(), StoreError> {
        let op = format!("write {key:?}");
        let bytes = serde_json::to_vec(rec).map_err(|e| err(&self.store.path, &op, e))?;
        let mut table = self
            .txn
            .open_table(SNAPSHOTS)
            .map_err(|e| err(&self.store.path, &op, e))?;
        table
            .insert(key, bytes.as_slice())
            .map_err(|e| err(&self.store.path, &op, e))?;
        Ok(())
    }

    /// Deletes the record of `key`.
    pub fn delete(&self, key: &str) -> Result<(), StoreError> {
        let op = format!("delete {key:?}");
        let mut table = self
            .txn
            .open_table(SNAPSHOTS)
            .map_err(|e| err(&self.store.path, &op, e))?;
        table
            .remove(key)
            .map_err(|e| err(&self.store.path, &op, e))?;
        Ok(())
    }

    /// Takes the next snapshot directory id.
    pub fn next_id(&self) -> Result<u64, StoreError> {
        let op = "allocate id";
        let mut table = self
            .txn
            .open_table(COUNTERS)
            .map_err(|e| err(&self.store.path, op, e))?;
        let id = table
            .get(NEXT_ID)
            .map_err(|e| err(&self.store.path, op, e))?
            .map(|v| v.value())
            .unwrap_or(1);
        table
            .insert(NEXT_ID, id + 1)
            .map_err(|e| err(&self.store.path, op, e))?;
        Ok(id)
    }

    /// Makes every change durable, atomically.
    pub fn commit(self) -> Result<(), StoreError> {
        self.txn
            .commit()
            .map_err(|e| err(&self.store.path, "commit", e))
    }
}

fn decode(path: &str, key: &str, bytes: &[u8]) -> Result<Record, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| err(path, &format!("decode record {key:?}"), e))
}

fn err(path: &str, op: &str, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> StoreError {
    StoreError {
        path: path.to_string(),
        op: op.to_string(),
        source: e.into(),
    }
}

//! `blockfmt`: the lsm layered block image format.
//!
//! - [`format`]: byte layouts of the immutable layer blob (FORMAT.md §1).
//! - [`chunk`]: compress and checked decode of one chunk.
//! - [`writer`]: streaming `LayerWriter` (deterministic output).
//! - [`reader`]: `Layer`, opened over the `ReadAt` seam in ≤ 2 ranged reads.
//! - [`merged`]: the merged index of a stack of layers (top wins).
//! - [`stack`]: `LayerStack`, layers + merged index + decoded-chunk cache.
//! - [`upper`]: the writable, crash-safe `UpperLayer` (FORMAT.md §3).
//! - [`image`]: `Image` = stack + optional upper layer.
//! - [`commit`]: commit, squash and raw import.
//! - [`dictionary`]: blocks of existing layers a new layer borrows (cross-image dedup).
//! - [`store`]: the `ChunkStore` seam for a host-wide cache of fetched chunks.
//!
//! Pure: no network, no daemon, no kernel.

#![forbid(unsafe_code)]

pub mod cache;
pub mod chunk;
pub mod commit;
pub mod dictionary;
pub mod error;
pub mod format;
pub mod image;
pub mod merged;
pub mod reader;
pub mod stack;
pub mod store;
pub mod upper;
pub mod writer;

pub use chunk::{Compression, Verify};
pub use dictionary::Dictionary;
pub use error::{Error, Result};
pub use image::{Alloc, Image};
pub use merged::MergedIndex;
pub use reader::{Layer, ReadAt};
pub use stack::{LayerStack, LoadTask, ParallelLoads};
pub use store::{ChunkKey, ChunkStore};
pub use upper::UpperLayer;
pub use writer::{LayerWriter, WriterOptions, WrittenLayer, ZeroPolicy};

/// OCI media type of a layer blob.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.lsm.layer.v1";
/// OCI annotation carrying the metadata digest of a layer.
pub const META_DIGEST_ANNOTATION: &str = "io.lsm.layer.meta-digest";
/// Layer annotation: the stored length of the blob's metadata section (FORMAT.md §1.2), so a
/// reader opens a remote layer in one exact read.
pub const META_LEN_ANNOTATION: &str = "io.lsm.layer.meta-len";
/// OCI annotation saying what a listed lsm blob is for; absent = a layer of the stack.
pub const ROLE_ANNOTATION: &str = "io.lsm.layer.role";
/// [`ROLE_ANNOTATION`] value of a blob that layers borrow chunks from but that is not stacked.
pub const ROLE_DICTIONARY: &str = "dictionary";

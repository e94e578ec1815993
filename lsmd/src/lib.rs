//! `lsmd`: the lsm daemon as a library — image configs and opening images today; sources, the
//! host cache and the NBD/ublk/FUSE frontends compose on top of these.

pub mod config;
pub mod error;
pub mod nbd;
pub mod pool;

pub use config::{ImageConfig, ImageSpec, LayerConfig, SourceConfig};
pub use error::{Error, Result};

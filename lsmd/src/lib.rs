//! `lsmd`: the lsm daemon as a library — image configs and opening images today; sources, the
//! host cache and the NBD/ublk/FUSE frontends compose on top of these.

pub mod cache;
pub mod config;
pub mod error;
pub mod metrics;
pub mod nbd;
pub mod pool;
pub mod source;

pub use config::{HostServices, ImageConfig, ImageSpec, LayerConfig, RegistryConfig, SourceConfig};
pub use error::{Error, Result};

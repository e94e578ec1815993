//! Frontends: the protocols through which a client or the kernel reaches an export. Each is a
//! thin adapter over [`crate::engine`], which owns the rule every frontend follows (hot work
//! inline, cold work on the shared pool).
//!
//! - [`nbd`]: NBD over Unix sockets and TCP (+ STARTTLS), and `/dev/nbdN` attach;
//! - [`ublk`]: `/dev/ublkbN` over io_uring;
//! - [`fuse`]: one file per export under a FUSE mount, for `losetup`;
//! - [`loop_device`]: loop devices over those files, with lsm's readahead.

pub mod fuse;
pub mod loop_device;
pub mod nbd;
pub mod ublk;

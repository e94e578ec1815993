//! The request engine: the one place that decides where a request runs. Hot work (decoded-chunk
//! hits, upper-layer reads, holes, writes) is done inline on the frontend's thread; cold work
//! (decode, fetch, FLUSH/FUA) goes to one [`pool::WorkerPool`] shared by every export.

pub mod pool;

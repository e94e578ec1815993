//! A blob source that streams one range of its blob before anyone asks for it: a startup
//! layer's chunks (FORMAT.md §9), fetched from the moment its metadata checked out, while the
//! image's layers still open and the trace still binds it, instead of after. The bytes are
//! only held: the layer above checks every chunk of them when it reads them, as it checks
//! any source's (nothing here is trusted), and a layer that is never stacked never reads
//! them — dropping the source stops the stream.
//!
//! Reads of the range ([`ReadAt::read_exact_at`], [`ReadAt::read_stream_at`]) take its bytes
//! from the stream, waiting for those not in yet; what the stream did not bring (it failed, or
//! a read reaches past it) comes from the source itself. Bytes that failed their check are
//! asked of the source again ([`ReadAt::read_again_at`]), never of the stream. Once a read has
//! taken the range's last byte, the stream's buffer is freed; a read that stops its stream
//! early (the layer above was refused) stops the stream ahead too.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use blockfmt::ReadAt;
use parking_lot::{Condvar, Mutex};

/// A source streaming one range ahead (see the module doc).
pub struct StreamAhead {
    inner: Arc<dyn ReadAt>,
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    arrived: Condvar,
    /// Set when the source is dropped: the stream stops at its next piece.
    cancel: AtomicBool,
}

#[derive(Default)]
struct State {
    /// The range streamed: `base..base + len` (`len` 0: none).
    base: u64,
    len: u64,
    /// Its bytes in so far, from `base` (unchecked).
    buf: Vec<u8>,
    /// The stream is over (all in, failed or cancelled): no more bytes will come.
    ended: bool,
    /// A read took the range's last byte: the buffer is gone; reads go to the source.
    released: bool,
}

impl StreamAhead {
    /// `inner`, streaming nothing yet.
    pub fn new(inner: Arc<dyn ReadAt>) -> StreamAhead {
        StreamAhead {
            inner,
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                arrived: Condvar::new(),
                cancel: AtomicBool::new(false),
            }),
        }
    }

    /// Starts streaming `base..base + len` of the blob on a thread of its own (once; later
    /// calls are ignored). A failed stream is logged; reads then go to the source.
    pub fn start(&self, name: &str, base: u64, len: u64) {
        {
            let mut st = self.shared.state.lock();
            if st.len > 0 || len == 0 {
                return;
            }
            st.base = base;
            st.len = len;
        }
        let (inner, shared, name) = (self.inner.clone(), self.shared.clone(), name.to_string());
        std::thread::spawn(move || {
            let r = inner.read_stream_at(base, len, &mut |piece| {
                if shared.cancel.load(Ordering::Relaxed) {
                    return false;
                }
                shared.state.lock().buf.extend_from_slice(piece);
                shared.arrived.notify_all();
                true
            });
            if let Err(e) = r {
                tracing::debug!(blob = %name, error = %e, "streaming ahead failed; reads go to the source");
            }
            shared.state.lock().ended = true;
            shared.arrived.notify_all();
        });
    }

    /// Hands `sink` the bytes `off..off + len` the stream holds or will bring, in order, as
    /// they arrive (waiting for them); returns how many were handed from `off` (0 when `off`
    /// is outside the range) and whether the sink wants more.
    fn drain(&self, off: u64, len: u64, sink: &mut dyn FnMut(&[u8]) -> bool) -> (u64, bool) {
        let mut st = self.shared.state.lock();
        if st.released || off < st.base || off >= st.base + st.len {
            return (0, true);
        }
        let end = (off + len).min(st.base + st.len);
        let mut at = off;
        while at < end {
            let have = st.base + st.buf.len() as u64;
            if have > at {
                let from = (at - st.base) as usize;
                let n = (have.min(end) - at) as usize;
                let piece = st.buf[from..from + n].to_vec();
                drop(st);
                let go_on = sink(&piece);
                at += n as u64;
                st = self.shared.state.lock();
                if !go_on {
                    // The reader stopped its stream (the layer was refused): nobody wants
                    // the rest, which would only take the link from the layers below.
                    self.shared.cancel.store(true, Ordering::Relaxed);
                    st.released = true;
                    st.buf = Vec::new();
                    return (at - off, false);
                }
            } else if st.ended {
                break;
            } else {
                self.shared.arrived.wait(&mut st);
            }
        }
        if at == st.base + st.len {
            st.released = true;
            st.buf = Vec::new();
        }
        (at - off, true)
    }
}

impl Drop for StreamAhead {
    fn drop(&mut self) {
        self.shared.cancel.store(true, Ordering::Relaxed);
    }
}

impl ReadAt for StreamAhead {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut filled = 0usize;
        let (handed, _) = self.drain(offset, buf.len() as u64, &mut |piece| {
            buf[filled..filled + piece.len()].copy_from_slice(piece);
            filled += piece.len();
            true
        });
        match handed as usize {
            n if n == buf.len() => Ok(()),
            n => self.inner.read_exact_at(&mut buf[n..], offset + n as u64),
        }
    }

    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }

    fn read_again_at(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        self.inner.read_again_at(buf, offset)
    }

    fn read_stream_at(
        &self,
        offset: u64,
        len: u64,
        sink: &mut dyn FnMut(&[u8]) -> bool,
    ) -> io::Result<()> {
        match self.drain(offset, len, sink) {
            (_, false) => Ok(()),
            (n, true) if n == len => Ok(()),
            (n, true) => self.inner.read_stream_at(offset + n, len - n, sink),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A blob whose streamed reads are counted and hand on 1000 bytes at a time.
    struct Counted {
        blob: Vec<u8>,
        streams: std::sync::atomic::AtomicU64,
        reads: std::sync::atomic::AtomicU64,
    }

    impl ReadAt for Counted {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.blob.read_exact_at(buf, offset)
        }
        fn size(&self) -> io::Result<u64> {
            Ok(self.blob.len() as u64)
        }
        fn read_stream_at(
            &self,
            offset: u64,
            len: u64,
            sink: &mut dyn FnMut(&[u8]) -> bool,
        ) -> io::Result<()> {
            self.streams.fetch_add(1, Ordering::SeqCst);
            let (a, b) = (offset as usize, (offset + len) as usize);
            for piece in self.blob[a..b].chunks(1000) {
                if !sink(piece) {
                    break;
                }
            }
            Ok(())
        }
    }

    fn counted() -> Arc<Counted> {
        Arc::new(Counted {
            blob: (0..100_000u32).map(|i| (i % 251) as u8).collect(),
            streams: 0.into(),
            reads: 0.into(),
        })
    }

    #[test]
    fn reads_of_the_range_come_from_the_one_stream_and_the_rest_from_the_source() {
        let src = counted();
        let ahead = StreamAhead::new(src.clone());
        ahead.start("blob", 10_000, 50_000);
        let mut got = Vec::new();
        ahead
            .read_stream_at(10_000, 20_000, &mut |p| {
                got.extend_from_slice(p);
                true
            })
            .expect("stream");
        let mut b = vec![0u8; 30_000];
        ahead.read_exact_at(&mut b, 30_000).expect("read");
        got.extend_from_slice(&b);
        assert_eq!(got, src.blob[10_000..60_000]);
        assert_eq!(src.streams.load(Ordering::SeqCst), 1);
        assert_eq!(src.reads.load(Ordering::SeqCst), 0);
        // The range's last byte was taken: the buffer is freed, reads go to the source.
        assert!(ahead.shared.state.lock().released);
        ahead.read_exact_at(&mut b[..100], 20_000).expect("read");
        assert_eq!(b[..100], src.blob[20_000..20_100]);
        assert_eq!(src.reads.load(Ordering::SeqCst), 1);
        // Past the range: the part in it from the stream... after release, all from the source.
        let mut tail = vec![0u8; 1000];
        ahead.read_exact_at(&mut tail, 99_000).expect("read");
        assert_eq!(tail, src.blob[99_000..]);
    }

    #[test]
    fn a_reader_that_stops_its_stream_stops_the_stream_ahead() {
        let src = counted();
        let ahead = StreamAhead::new(src.clone());
        ahead.start("blob", 0, 50_000);
        ahead
            .read_stream_at(0, 50_000, &mut |_| false)
            .expect("stream");
        assert!(ahead.shared.cancel.load(Ordering::SeqCst));
        assert!(ahead.shared.state.lock().released);
        let mut b = vec![0u8; 100];
        ahead.read_exact_at(&mut b, 40_000).expect("read");
        assert_eq!(b, src.blob[40_000..40_100]);
        assert_eq!(src.reads.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_read_reaching_past_the_stream_takes_the_rest_from_the_source() {
        let src = counted();
        let ahead = StreamAhead::new(src.clone());
        ahead.start("blob", 0, 5_000);
        let mut b = vec![0u8; 8_000];
        ahead.read_exact_at(&mut b, 1_000).expect("read");
        assert_eq!(b, src.blob[1_000..9_000]);
        assert_eq!(src.reads.load(Ordering::SeqCst), 1);
    }
}

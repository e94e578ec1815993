//! `lsmd`: serves layered block images as disks. `lsmd serve --help` lists the options.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use lsmd::cache::DiskCache;
use lsmd::engine::Engine;
use lsmd::nbd::{serve_connection, Duplex, Export, Exports, Limits, Server, TlsConfig};
use lsmd::{parse_size, HostServices, ImageSpec};

/// The lsm daemon: serves layered block images over NBD.
#[derive(Parser)]
#[command(name = "lsmd", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve images over NBD on a Unix socket and/or TCP until SIGTERM or SIGINT, which flush
    /// every upper layer before exiting.
    ///
    /// Refused at start, with an error naming the layer: a remote layer or dictionary blob
    /// (registry, http, nas; a P2P agent fronts a registry) without `meta_digest` in the config,
    /// because nothing would tie the bytes a server sends to the image's manifest (see
    /// --allow-unverified); a `meta_digest` that does not match. Registry credentials are sent
    /// only to the registry and to token servers on its host, a mirror's or a `token_hosts` entry,
    /// never over plain http:// to a host that is not loopback; a mirror gets only credentials
    /// given for it. Errors, logs and metrics never show a URL's query string or userinfo.
    Serve {
        /// Image config to serve as export `NAME` (`NAME=PATH`), or as the default export (a
        /// bare PATH, named after the file). Repeat for several exports.
        #[arg(long = "config", required = true)]
        configs: Vec<String>,
        /// Unix socket path to listen on. It accepts only once the `--fuse` files (if any) are
        /// mounted, so a connecting client may rely on them.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// TCP address to listen on, e.g. 127.0.0.1:10809. NBD is plain text: an address that
        /// is not loopback (including 0.0.0.0) is refused unless the connections are encrypted
        /// (--tls-cert/--tls-key) or --insecure-tcp says plain text is intended; a writable
        /// export on such an address is warned about.
        #[arg(long)]
        tcp: Option<String>,
        /// Allow --tcp on a non-loopback address without TLS: anyone on the network can then
        /// read (and without --read-only, write) every export.
        #[arg(long)]
        insecure_tcp: bool,
        /// PEM certificate (chain) for NBD over TLS on --tcp: clients must then STARTTLS
        /// (qemu `--object tls-creds-x509,...`, libnbd `nbds://`). Needs --tls-key.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM private key of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// PEM CA certificate(s): TLS clients must present a certificate issued by one.
        #[arg(long, requires = "tls_cert")]
        tls_client_ca: Option<PathBuf>,
        /// Serve every image read-only: reads still see what an upper layer holds, writes fail.
        #[arg(long)]
        read_only: bool,
        /// Threads shared by all connections for work that may block (cold chunk decodes,
        /// fetches, flushes); hot reads and writes are served on each connection's thread.
        /// Most of them wait on a source, so there are more than cores: a cold read at queue
        /// depth 32 from a registry 5 ms away needs that many fetches in flight.
        #[arg(long, default_value_t = 32)]
        workers: usize,
        /// Microseconds a connection thread polls for the next request before sleeping; saves
        /// the cross-CPU wake-up (tens of µs on VMs) on back-to-back requests. 0 disables.
        #[arg(long, default_value_t = 50)]
        busy_poll_us: u64,
        /// Most NBD client connections (Unix socket and TCP together) served at once; more are
        /// closed at accept, so no client can exhaust threads or memory. Each connection holds
        /// at most ~33 MiB (buffers and one request payload).
        #[arg(long, default_value_t = 256)]
        max_connections: usize,
        /// Seconds a client has from connecting to choosing an export; one that sends nothing
        /// (or haggles forever) is dropped. 0 disables.
        #[arg(long, default_value_t = 30)]
        handshake_timeout: u64,
        /// Seconds one write of a reply may make no progress before the connection is dropped:
        /// a client that stops reading its replies never holds a shared worker or a lock for
        /// longer. 0 disables (not advised).
        #[arg(long, default_value_t = 30)]
        write_timeout: u64,
        /// Seconds a client may send no request while none of its requests is in flight before
        /// it is dropped. 0 (the default) keeps idle clients: a mounted disk may be idle for days.
        #[arg(long, default_value_t = 0)]
        idle_timeout: u64,
        /// Directory of the host cache of fetched chunks, shared by every image (and every
        /// lsmd) on the host; survives restarts. Without it remote chunks are fetched on every
        /// decoded-chunk cache miss.
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Bound of the host cache, bytes (suffixes K, M, G).
        #[arg(long, default_value = "10G", value_parser = parse_size)]
        cache_limit: u64,
        /// Serve Prometheus metrics (`/metrics`) and status (`/status`) on this address, e.g.
        /// 127.0.0.1:9810.
        #[arg(long)]
        metrics: Option<String>,
        /// What to fetch in the background at start: `trace` replays `<config>.trace` (made
        /// by `lsmctl trace record`) if there is one, else the trace shipped in the image
        /// (config `trace`, made by `lsmctl trace bake`; digest-checked), else the used part
        /// of the ext4 inode tables; `all` does that, then fetches every other chunk at low
        /// priority; `none` fetches only what reads need.
        #[arg(long, default_value = "trace", value_parser = ["none", "trace", "all"])]
        prefetch: String,
        /// Fetches a trace's prefetch keeps in flight at once (each up to 1 MiB, in the order
        /// the start first needs them). On a slow link more at once only share it: the
        /// fetch the start waits for first arrives later.
        #[arg(long, default_value_t = lsmd::trace::PREFETCH_THREADS, value_parser = clap::value_parser!(u32).range(1..=64))]
        prefetch_threads: u32,
        /// Record exact startup traces: only chunks reads touched (also those served from the
        /// decoded-chunk cache), not the ones a sequential reader's widened fetch took along
        /// unread. For `lsmctl trace bake`: every chunk of a shipped trace is fetched by every
        /// node that uses it.
        #[arg(long)]
        exact_trace: bool,
        /// Hot groups: a reader's second miss within one aligned stretch of KIB of a layer
        /// fetches that stretch's cold chunks with it, in one request (0: off, the default).
        /// Fewer round trips for a start that faults pages in here and there (binaries,
        /// libraries), for more bytes: measured on the python image with 32 KiB chunks and
        /// 1024, 203 → 136 requests for 8.2 → 11.6 MB; with 128 KiB chunks no fewer requests.
        #[arg(long, default_value_t = 0, value_name = "KIB")]
        hot_group_kb: u64,
        /// Fetch ahead in a file, lazy starts only (no trace): once the ext4 inode tables are
        /// in, a reader's miss in a regular file's data also fetches the file's next cold
        /// chunks, up to KIB stored bytes, in one GET beside the reader's (at most 4 such
        /// GETs in flight; 0: off, the default — fewer GETs but a slower start at 100 Mbit/s,
        /// see README).
        #[arg(long, default_value_t = lsmd::cache::fsmeta::FILE_AHEAD_KB, value_name = "KIB")]
        file_ahead_kb: u64,
        /// Also mount every export as a regular file named after it in this directory (FUSE),
        /// for `losetup` + `mount` where the kernel has neither nbd nor ublk. Unmounted at exit.
        #[arg(long)]
        fuse: Option<PathBuf>,
        /// Attach an export to a kernel nbd device, `NAME=/dev/nbdN` (repeat for more);
        /// detached, after the kernel's requests complete, at exit.
        #[arg(long = "nbd-device")]
        nbd_devices: Vec<String>,
        /// Seconds the kernel holds an nbd device's I/O after lsmd dies, waiting for a
        /// restarted lsmd to take the device over (netlink attach).
        #[arg(long, default_value_t = 120)]
        nbd_dead_timeout: u64,
        /// Serve an export as a ublk block device (/dev/ublkbN, numbered by the kernel; the
        /// log says which). Repeat for more. Stopped at exit.
        #[arg(long = "ublk")]
        ublk: Vec<String>,
        /// Hardware queues of each new ublk device (one serving thread each).
        #[arg(long, default_value_t = 1)]
        ublk_queues: u16,
        /// Requests in flight per ublk queue.
        #[arg(long, default_value_t = 64)]
        ublk_depth: u16,
        /// Where lsmd remembers its ublk device ids, so that a restarted lsmd takes over the
        /// devices (and their mounts) instead of creating new ones.
        #[arg(long, default_value = "/run/lsm")]
        state_dir: PathBuf,
        /// Serve remote layers that have no `meta_digest` anyway: their bytes are then tied to
        /// nothing but what the server says. Logs a warning at every open. For testing only.
        #[arg(long)]
        allow_unverified: bool,
        /// PEM file of the CA certificates trusted for HTTPS registries and URLs whose config
        /// names no `ca_file` (instead of the system's roots). A server whose certificate does
        /// not verify fails the read at once, saying so.
        #[arg(long, value_name = "PEM")]
        registry_ca: Option<PathBuf>,
    },
}

/// How exports fetch ahead of their readers, and what they record (`serve`'s flags).
struct PrefetchOptions<'a> {
    mode: &'a str,
    threads: usize,
    exact_trace: bool,
    hot_group_kb: u64,
    file_ahead_kb: u64,
}

fn open_exports(
    configs: &[String],
    read_only: bool,
    host: &HostServices,
    prefetch: &PrefetchOptions,
) -> Result<Exports, String> {
    let mut list = Vec::new();
    for c in configs {
        let (name, path) = match c.split_once('=') {
            Some((n, p)) => (n.to_string(), PathBuf::from(p)),
            None => {
                let p = PathBuf::from(c);
                (
                    p.file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    p,
                )
            }
        };
        if list.iter().any(|e: &Export| e.name == name) {
            return Err(format!(
                "two exports are named {name:?}: name them with NAME=PATH"
            ));
        }
        let spec = ImageSpec::load(&path).map_err(|e| e.to_string())?;
        // The shipped trace is fetched while the layers open (a round trip saved).
        let node = match prefetch.mode {
            "none" => None,
            _ => node_trace(&spec),
        };
        let shipped = match node {
            None => shipped_trace_fetch(&spec, host, prefetch.mode),
            Some(_) => None,
        };
        // The startup layer opened too (its metadata, one request; its chunks are prefetched
        // first once it is stacked, and checked each as it arrives); it is stacked only once
        // the shipped trace binds it to this image's layer chain.
        let startup = match (&shipped, &spec.config.startup) {
            (Some(_), Some(_)) => {
                let (spec, host) = (spec.clone(), host.clone());
                Some(std::thread::spawn(move || {
                    lsmd::trace::open_startup(&spec, &host)
                }))
            }
            _ => None,
        };
        let mut shipped = shipped.map(ShippedTrace::Fetching);
        let mut stacked = false;
        let image = spec
            .open_image_with(!read_only, host, |layers| {
                let fetch = startup?;
                let trace = shipped.take()?.wait();
                let digest = spec
                    .config
                    .startup
                    .as_ref()
                    .and_then(|t| t.digest.as_deref());
                let layer = startup_layer(&name, fetch, digest, &trace, layers, spec.config.size);
                shipped = Some(ShippedTrace::Ready(trace));
                stacked = layer.is_some();
                layer
            })
            .map_err(|e| e.to_string())?;
        tracing::info!(export = %name, config = %path.display(), size = image.size(), read_only = image.read_only(), "export ready");
        image.lower().set_exact_trace(prefetch.exact_trace);
        image
            .lower()
            .set_hot_group_bytes(prefetch.hot_group_kb.saturating_mul(1024));
        image
            .lower()
            .set_file_ahead_bytes(prefetch.file_ahead_kb.saturating_mul(1024));
        let image = Arc::new(image);
        start_prefetch(
            &name,
            node,
            shipped.map(|s| (s, stacked)),
            &image,
            prefetch.mode,
            prefetch.threads,
        );
        list.push(Export::new(name, image));
    }
    Ok(Exports::new(list))
}

/// A shipped trace being fetched and checked (`lsmd::trace::fetch_shipped`).
type ShippedFetch = std::thread::JoinHandle<Result<Option<lsmd::trace::Trace>, String>>;

/// What became of a shipped trace: checked, or still being fetched.
type ShippedResult = Result<Option<lsmd::trace::Trace>, String>;

/// A shipped trace, still being fetched or already waited for (to bind the startup layer).
enum ShippedTrace {
    Fetching(ShippedFetch),
    Ready(ShippedResult),
}

impl ShippedTrace {
    fn wait(self) -> ShippedResult {
        match self {
            ShippedTrace::Fetching(h) => h
                .join()
                .unwrap_or_else(|_| Err("fetching the shipped trace panicked".into())),
            ShippedTrace::Ready(r) => r,
        }
    }
}

/// A startup layer being opened (`lsmd::trace::open_startup`).
type StartupFetch = std::thread::JoinHandle<Result<Option<blockfmt::Layer>, String>>;

/// The shipped startup layer to stack over `layers`, if it opened (its metadata checked) and
/// the digest-checked shipped `trace` binds it (the config's `digest`, its metadata digest)
/// to exactly this layer chain (`lsmd::trace::bind_startup`). Anything else: none, said
/// (warning and `lsm_trace_total{trace="startup",result="refused"}`), and the image is served
/// without it.
fn startup_layer(
    name: &str,
    fetch: StartupFetch,
    digest: Option<&str>,
    trace: &ShippedResult,
    layers: &[blockfmt::Layer],
    size: u64,
) -> Option<blockfmt::Layer> {
    use std::sync::atomic::Ordering::Relaxed;
    let stats = &lsmd::trace::STATS;
    let blob = fetch
        .join()
        .unwrap_or_else(|_| Err("fetching the startup layer panicked".into()));
    let bound = match (blob, trace) {
        (Ok(None), _) => return None,
        (Err(e), _) => Err(e),
        (Ok(Some(_)), Err(e)) => Err(format!("the shipped trace that binds it is refused: {e}")),
        (Ok(Some(_)), Ok(None)) => Err("the image ships no trace to bind it".into()),
        (Ok(Some(l)), Ok(Some(t))) => lsmd::trace::bind_startup(l, digest, t, layers, size),
    };
    match bound {
        Ok(l) => {
            stats.startup_used.fetch_add(1, Relaxed);
            tracing::info!(export = %name, chunks = l.metadata().chunks.len(), bytes = l.blob_size(), "stacking the startup layer shipped in the image (metadata digest and layer chain checked; chunks checked as they arrive)");
            Some(l)
        }
        Err(e) => {
            stats.startup_refused.fetch_add(1, Relaxed);
            tracing::warn!(export = %name, error = %e, "{STARTUP_REFUSED}");
            None
        }
    }
}

/// The trace this node recorded for `spec`'s image (`<config>.trace`), if there is a good one.
fn node_trace(spec: &ImageSpec) -> Option<lsmd::trace::Trace> {
    let trace_file = lsmd::trace::trace_path(&spec.path);
    let b = std::fs::read(&trace_file).ok()?;
    lsmd::trace::Trace::decode(&b)
        .inspect_err(
            |e| tracing::warn!(trace = %trace_file.display(), error = %e, "ignoring a bad trace"),
        )
        .ok()
}

/// Starts fetching the trace shipped in `spec`'s image, on its own thread, when `--prefetch`
/// will want it (the node's own trace, when it has one, goes first and the shipped one is not
/// fetched).
fn shipped_trace_fetch(spec: &ImageSpec, host: &HostServices, mode: &str) -> Option<ShippedFetch> {
    if mode == "none" || spec.config.trace.is_none() {
        return None;
    }
    let (spec, host) = (spec.clone(), host.clone());
    Some(std::thread::spawn(move || {
        lsmd::trace::fetch_shipped(&spec, &host)
    }))
}

/// Starts the background fetches `--prefetch` asks for: the node's recorded trace
/// (`node`, from `<config>.trace`) if there is one, else the trace shipped in the image (`shipped`, fetched
/// while the layers opened, checked against its digest; refused → lazy, and said so), else the
/// filesystem's metadata (`cache::fsmeta`: the used part of ext4's inode tables, then the
/// directory and extent-tree blocks they point to); then with `all` the rest of the image.
fn start_prefetch(
    name: &str,
    node: Option<lsmd::trace::Trace>,
    shipped: Option<(ShippedTrace, bool)>,
    image: &Arc<blockfmt::Image>,
    mode: &str,
    threads: usize,
) {
    if mode == "none" {
        return;
    }
    let all = mode == "all";
    let (name, image) = (name.to_string(), image.clone());
    std::thread::spawn(move || {
        use std::sync::atomic::Ordering::Relaxed;
        let stats = &lsmd::trace::STATS;
        // With a startup layer stacked: the whole trace, for when the layer is refused.
        let mut whole = None;
        let traced = match node {
            Some(t) => {
                stats.node_used.fetch_add(1, Relaxed);
                tracing::info!(export = %name, "replaying the startup trace");
                t.resolve(&image)
            }
            None => match shipped.map(|(s, stacked)| (s.wait(), stacked)) {
                None => Vec::new(),
                Some((Ok(Some(t)), stacked)) => {
                    stats.shipped_used.fetch_add(1, Relaxed);
                    tracing::info!(export = %name, chunks = t.entries.len(), startup_layer = stacked, "replaying the startup trace shipped in the image (digest checked)");
                    match stacked {
                        // The startup layer first (`startup_first`), then the chunks it
                        // does not cover.
                        true => {
                            whole = Some(t.resolve(&image));
                            t.uncovered().resolve(&image)
                        }
                        false => t.resolve(&image),
                    }
                }
                Some((Ok(None), _)) => Vec::new(),
                Some((Err(e), _)) => {
                    stats.shipped_refused.fetch_add(1, Relaxed);
                    tracing::warn!(export = %name, error = %e, "refusing the startup trace shipped in the image; serving lazily");
                    Vec::new()
                }
            },
        };
        if let Some(whole) = whole {
            startup_first(&name, &image, traced, whole, threads);
        } else if !traced.is_empty() {
            lsmd::trace::prefetch(&name, &image, traced, threads, true);
        } else {
            let tables = lsmd::cache::fsmeta::ext4_inode_tables(&image);
            let chunks = lsmd::cache::fsmeta::chunks_of(&image, &tables);
            if !chunks.is_empty() {
                let bytes: u64 = tables.iter().map(|t| t.1).sum();
                tracing::info!(export = %name, chunks = chunks.len(), inode_table_bytes = bytes, "no startup trace: prefetching the filesystem's metadata (ext4 inode tables in use)");
                lsmd::trace::prefetch_widening(&name, &image, chunks, 8);
                let runs = lsmd::cache::fsmeta::map_files(&image);
                tracing::info!(export = %name, file_runs = runs, "files mapped for fetching ahead");
            }
        }
        if all {
            lsmd::trace::prefetch(&name, &image, lsmd::trace::all_chunks(&image), 1, false);
        }
    });
}

/// With the shipped startup layer stacked: its chunks first, as ONE in-order stream (reads
/// meanwhile wait for the chunk they need as it arrives: `lsmd::trace::stream_startup`),
/// and only then the `uncovered` trace entries on `threads` — or, once the layer is refused
/// (a chunk failed, by the stream or by a read), the `whole` trace instead.
fn startup_first(
    name: &str,
    image: &Arc<blockfmt::Image>,
    uncovered: Vec<(u16, u32)>,
    whole: Vec<(u16, u32)>,
    threads: usize,
) {
    let listed = startup_chunks(image)
        .into_iter()
        .chain(uncovered.iter().copied());
    lsmd::trace::hold_cache_for(image, listed);
    lsmd::trace::stream_startup(name, image);
    if !image.lower().top_refused() {
        lsmd::trace::prefetch(name, image, uncovered, threads, true);
    }
    if image.lower().top_refused() {
        startup_refused(name, image, whole, threads);
    }
}

/// What lsmd says when it refuses a shipped startup layer.
const STARTUP_REFUSED: &str =
    "refusing the startup layer shipped in the image; its blocks are read from the layers";

/// After a stacked startup layer (the stack's fallible top) was refused because one of its
/// chunks failed its digest check or could not be read (by a read or by the prefetch): says
/// so as at open (warning, `lsm_trace_total{trace="startup",result="refused"}`), then
/// prefetches the `whole` shipped trace from the layers, as without a startup layer.
fn startup_refused(
    name: &str,
    image: &Arc<blockfmt::Image>,
    whole: Vec<(u16, u32)>,
    threads: usize,
) {
    use std::sync::atomic::Ordering::Relaxed;
    lsmd::trace::STATS.startup_refused.fetch_add(1, Relaxed);
    tracing::warn!(export = %name, error = "a chunk failed its digest check or could not be read", "{STARTUP_REFUSED}");
    lsmd::trace::prefetch(name, image, whole, threads, true);
}

/// Every chunk of the top layer of `image`'s stack (the startup layer, when one is stacked),
/// in its order: what the start reads first, stored first.
fn startup_chunks(image: &blockfmt::Image) -> Vec<(u16, u32)> {
    let layers = image.lower().layers();
    let top = layers.len().saturating_sub(1);
    let n = layers
        .last()
        .map_or(0, |l| l.metadata().chunks.len() as u32);
    (0..n).map(|c| (top as u16, c)).collect()
}

/// The TLS configuration of `--tcp` (from `cert_key`, with `client_ca`), after refusing what
/// is unsafe: TLS without TCP, or a non-loopback address without TLS unless `insecure`.
fn tcp_security(
    tcp: Option<&str>,
    cert_key: Option<(&std::path::Path, &std::path::Path)>,
    client_ca: Option<&std::path::Path>,
    insecure: bool,
    read_only: bool,
) -> Result<Option<TlsConfig>, String> {
    let tls = match cert_key {
        Some((cert, key)) => {
            Some(TlsConfig::load(cert, key, client_ca).map_err(|e| format!("TLS: {e}"))?)
        }
        None => None,
    };
    match tcp {
        Some(addr) => check_tcp_exposure(addr, tls.is_some(), insecure, read_only)
            .map_err(|e| format!("--tcp {addr}: {e}"))?,
        None if tls.is_some() => {
            return Err("--tls-cert is for --tcp connections; give --tcp ADDR".into())
        }
        None => {}
    }
    Ok(tls)
}

/// Refuses a non-loopback TCP address without TLS unless `insecure` (plain NBD on a network
/// hands every export to anyone on it); warns about exposed writable exports.
fn check_tcp_exposure(
    addr: &str,
    tls: bool,
    insecure: bool,
    read_only: bool,
) -> Result<(), String> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<std::net::SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| format!("not an address: {e}"))?
        .collect();
    if addrs.iter().all(|a| a.ip().is_loopback()) {
        return Ok(());
    }
    if !tls && !insecure {
        return Err(
            "not a loopback address, and NBD without TLS lets anyone on the network read and \
             write the exports: give --tls-cert and --tls-key, or --insecure-tcp if plain text \
             is intended"
                .into(),
        );
    }
    if !tls {
        tracing::warn!(tcp = %addr, "serving NBD in plain text on a non-loopback address (--insecure-tcp)");
    }
    if !read_only {
        tracing::warn!(tcp = %addr, "exports are writable by every client that can reach a non-loopback address; consider --read-only");
    }
    Ok(())
}

/// Connections being served, against `--max-connections`.
struct ConnectionSlots {
    open: AtomicUsize,
    max: usize,
}

/// One taken slot; given back when the connection's thread ends, however it ends.
struct Slot(Arc<ConnectionSlots>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnectionSlots {
    fn take(self: &Arc<Self>) -> Option<Slot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self.clone()))
    }
}

/// Accepts connections on a thread of its own and serves each on a thread of its own, while
/// fewer than the cap are open; a connection over the cap is closed at once.
fn spawn_accept_loop<S: Duplex>(
    mut accept: impl FnMut() -> std::io::Result<S> + Send + 'static,
    server: Server,
    slots: Arc<ConnectionSlots>,
) {
    std::thread::spawn(move || loop {
        match accept() {
            Ok(s) => {
                let Some(slot) = slots.take() else {
                    tracing::warn!(
                        max = slots.max,
                        "connection refused: --max-connections reached"
                    );
                    continue;
                };
                let server = server.clone();
                let spawned = std::thread::Builder::new().spawn(move || {
                    let _slot = slot;
                    let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        serve_connection(s, &server)
                    }));
                    match served {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::warn!(error = %e, "connection ended with an error"),
                        Err(p) => tracing::error!(
                            panic = lsmd::engine::pool::panic_message(&*p),
                            "a connection thread panicked; the connection is dropped"
                        ),
                    }
                });
                if let Err(e) = spawned {
                    // The closure (connection and slot) is dropped: the client sees it closed.
                    tracing::warn!(error = %e, "cannot start a connection thread");
                }
            }
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    });
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse().cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lsmd: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `lsmd serve`: opens the exports, starts every frontend asked for, serves until SIGTERM or
/// SIGINT, then stops the frontends and flushes. An error is what to tell the user.
fn run(cmd: Cmd) -> Result<(), String> {
    let Cmd::Serve {
        configs,
        socket,
        tcp,
        insecure_tcp,
        tls_cert,
        tls_key,
        tls_client_ca,
        read_only,
        workers,
        busy_poll_us,
        max_connections,
        handshake_timeout,
        write_timeout,
        idle_timeout,
        cache_dir,
        cache_limit,
        metrics,
        prefetch,
        prefetch_threads,
        exact_trace,
        hot_group_kb,
        file_ahead_kb,
        fuse,
        nbd_devices,
        nbd_dead_timeout,
        ublk,
        ublk_queues,
        ublk_depth,
        state_dir,
        allow_unverified,
        registry_ca,
    } = cmd;
    if socket.is_none()
        && tcp.is_none()
        && fuse.is_none()
        && nbd_devices.is_empty()
        && ublk.is_empty()
    {
        return Err(
            "give --socket PATH, --tcp ADDR, --fuse DIR, --nbd-device NAME=DEV \
                    and/or --ublk NAME"
                .into(),
        );
    }
    let tls = match tcp_security(
        tcp.as_deref(),
        tls_cert.as_deref().zip(tls_key.as_deref()),
        tls_client_ca.as_deref(),
        insecure_tcp,
        read_only,
    ) {
        Ok(t) => t,
        Err(e) => {
            return Err(e.to_string());
        }
    };
    let mut host = HostServices {
        allow_unverified,
        ca_file: registry_ca,
        ..HostServices::default()
    };
    if host.allow_unverified {
        tracing::warn!(
            "--allow-unverified: remote layers without meta_digest will be served unverified"
        );
    }
    if let Some(dir) = &cache_dir {
        match DiskCache::open(dir, cache_limit) {
            Ok(c) => {
                tracing::info!(cache = %dir.display(), bytes = c.bytes(), entries = c.len(), limit = cache_limit, "host cache ready");
                host.cache = Some(Arc::new(c));
            }
            Err(e) => {
                return Err(format!("cache: {e}"));
            }
        }
    }
    let prefetch = PrefetchOptions {
        mode: &prefetch,
        threads: prefetch_threads as usize,
        exact_trace,
        hot_group_kb,
        file_ahead_kb,
    };
    let exports = match open_exports(&configs, read_only, &host, &prefetch) {
        Ok(e) => e,
        Err(e) => {
            return Err(e.to_string());
        }
    };
    let engine = Engine::new(workers);
    for e in exports.all() {
        engine.serve_image(&e.image);
    }
    if let Some(addr) = metrics {
        match std::net::TcpListener::bind(&addr) {
            Ok(l) => {
                tracing::info!(metrics = %addr, "serving metrics");
                lsmd::metrics::spawn(l, host.clone(), exports.clone());
            }
            Err(e) => {
                return Err(format!("metrics {addr}: {e}"));
            }
        }
    }
    let server = Server {
        exports: exports.clone(),
        engine,
        busy_poll: std::time::Duration::from_micros(busy_poll_us),
        limits: Limits {
            handshake: Some(Duration::from_secs(handshake_timeout)),
            write: Some(Duration::from_secs(write_timeout)),
            idle: Some(Duration::from_secs(idle_timeout)),
        },
        tls: None,
    };
    let slots = Arc::new(ConnectionSlots {
        open: AtomicUsize::new(0),
        max: max_connections,
    });
    // FUSE files before the listeners: a client (or test) that sees the socket accept may
    // rely on the files being there.
    let fuse_mount = match &fuse {
        Some(dir) => {
            let files = exports.all().cloned().collect();
            match lsmd::fuse::mount(dir, files, &server.engine) {
                Ok(m) => {
                    tracing::info!(fuse = %dir.display(), "exports mounted as files");
                    Some(m)
                }
                Err(e) => {
                    return Err(format!("FUSE mount on {}: {e}", dir.display()));
                }
            }
        }
        None => None,
    };
    if let Some(path) = socket {
        let _ = std::fs::remove_file(&path);
        let l = match std::os::unix::net::UnixListener::bind(&path) {
            Ok(l) => l,
            Err(e) => {
                return Err(format!("{}: {e}", path.display()));
            }
        };
        tracing::info!(socket = %path.display(), "listening");
        spawn_accept_loop(
            move || l.accept().map(|(s, _)| s),
            server.clone(),
            slots.clone(),
        );
    }
    if let Some(addr) = tcp {
        let l = match std::net::TcpListener::bind(&addr) {
            Ok(l) => l,
            Err(e) => {
                return Err(format!("{addr}: {e}"));
            }
        };
        tracing::info!(tcp = %addr, tls = tls.is_some(), "listening");
        let server = Server {
            tls: tls.clone(),
            ..server.clone()
        };
        spawn_accept_loop(
            move || {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Ok(s)
            },
            server.clone(),
            slots.clone(),
        );
    }
    let mut attached = Vec::new();
    for spec in &nbd_devices {
        let (name, dev) = spec.split_once('=').unwrap_or(("", spec));
        let Some(export) = exports.find(name) else {
            return Err(format!("--nbd-device {spec}: no export named {name:?}"));
        };
        let state = state_dir.join(format!("nbd-{name}.index"));
        match lsmd::nbd::kernel::KernelAttachment::attach(
            std::path::Path::new(dev),
            export,
            &server,
            &state,
            nbd_dead_timeout,
        ) {
            Ok(a) => {
                tracing::info!(export = %name, device = %dev, "attached");
                attached.push(a);
            }
            Err(e) => {
                return Err(format!("--nbd-device {spec}: {e}"));
            }
        }
    }
    let mut ublk_devices = Vec::new();
    for name in &ublk {
        let Some(export) = exports.all().find(|e| &e.name == name).cloned() else {
            return Err(format!("--ublk {name}: no such export"));
        };
        let state = state_dir.join(format!("ublk-{name}.id"));
        let opts = lsmd::ublk::UblkOptions {
            queues: ublk_queues,
            depth: ublk_depth,
            user_copy: true,
        };
        match lsmd::ublk::UblkDevice::start(export, &state, opts, &server.engine) {
            Ok(d) => {
                let copy = if d.user_copy() { "user" } else { "buffers" };
                tracing::info!(export = %name, device = %d.block_device(), copy, "ublk device started");
                ublk_devices.push(d);
            }
            Err(e) => {
                return Err(format!("--ublk {name}: {e}"));
            }
        }
    }
    let mut signals = match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ]) {
        Ok(s) => s,
        Err(e) => {
            return Err(format!("cannot install signal handlers: {e}"));
        }
    };
    if let Some(sig) = signals.forever().next() {
        tracing::info!(signal = sig, "shutting down: flushing upper layers");
    }
    for (d, name) in ublk_devices.into_iter().zip(&ublk) {
        let dev = d.block_device();
        if let Err(e) = d.stop() {
            tracing::error!(device = %dev, error = %e, "ublk stop failed");
        }
        let _ = std::fs::remove_file(state_dir.join(format!("ublk-{name}.id")));
    }
    for a in attached {
        let dev = a.device().display().to_string();
        if let Err(e) = a.detach() {
            tracing::error!(device = %dev, error = %e, "detach failed");
        }
    }
    drop(fuse_mount);
    let failed = exports.flush_all();
    for (name, e) in &failed {
        tracing::error!(export = %name, error = %e, "flush failed");
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} export(s) failed their last flush",
            failed.len()
        ))
    }
}

//! `lsm-snapshotter`: containerd's snapshots gRPC service on a Unix socket, for containerd's
//! proxy plugin config (`[proxy_plugins.lsm] type = "snapshot" address = "SOCKET"`).
//!
//! A binary of its own rather than `lsmd snapshotter`: it is an async (tokio + tonic) gRPC
//! server, while lsmd is a thread-per-connection block server with no async runtime. Keeping
//! them apart keeps tokio, tonic and the containerd protocol out of lsmd's build and its
//! attack surface, lets each be restarted on its own (containerd reconnects to the socket;
//! lsmd keeps serving the devices), and matches how the peers ship (overlaybd-snapshotter,
//! containerd-nydus-grpc, containerd-stargz-grpc are separate daemons).
//!
//! What it serves: overlayfs-style snapshots (`snapshots.rs`) with metadata in `redb`
//! (`store.rs`), so containerd unpacks and runs any OCI image with `--snapshotter lsm`; and
//! lsm layers (`lsm.rs`): converted layers recorded from Prepare labels without fetching, and
//! containers' root filesystems served lazily by lsmd from them.
//!
//! Concurrency: tonic serves each connection on tokio's multi-threaded runtime; the service's
//! own locking is described in `snapshots.rs`. SIGTERM/SIGINT stop accepting, finish the calls
//! in flight, and remove the socket.

mod filter;
mod lsm;
mod snapshots;
mod store;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use containerd_snapshots::tonic::transport::Server;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

/// containerd remote snapshotter for lsm: serves containerd's snapshots API on a Unix socket.
#[derive(Parser)]
#[command(name = "lsm-snapshotter", version, about)]
struct Cli {
    /// Unix socket to serve on; containerd's `[proxy_plugins.lsm] address`. A stale socket
    /// file there is replaced; any other file there is an error.
    #[arg(long)]
    socket: PathBuf,
    /// State directory: `metadata.redb` (snapshot metadata), `snapshots/<id>/` (snapshot
    /// contents), `staging/` (snapshots being made). One snapshotter per directory.
    #[arg(long)]
    root: PathBuf,
    /// A registry (`host[:port]`, as in the image reference) reached over plain http instead of
    /// https, as containerd's hosts.toml would say. Repeat for more.
    #[arg(long = "plain-http", value_name = "HOST[:PORT]")]
    plain_http: Vec<String>,
    /// PEM CA certificates trusted for HTTPS registries instead of the system's.
    #[arg(long, value_name = "PEM")]
    registry_ca: Option<PathBuf>,
    /// lsmd's host cache of fetched chunks, shared by every snapshot's lsmd.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Readahead (KiB) of the block devices a snapshot's filesystem is mounted from (the loop
    /// over a FUSE file, the nbd or ublk device). Every page the kernel reads ahead is a
    /// chunk fetched from the registry; a loop device over a FUSE file gets 2560 KiB from
    /// the kernel, which made a python start fetch a third more (README "What a lazy start
    /// fetches"). 0 keeps what the kernel chose.
    #[arg(long, value_name = "KIB", default_value_t = 128)]
    read_ahead_kb: u32,
    /// A mirror of a registry: `HOST[:PORT]=URL` (the registry as in image references, the
    /// mirror's `http(s)://host[:port]`), asked first for that registry's layer blobs; the
    /// registry serves when the mirror fails. Repeat for more (tried in order). Credentials
    /// for a mirror come from docker's config.json entry for the mirror's host, never the
    /// registry's.
    #[arg(long = "mirror", value_name = "HOST=URL", value_parser = parse_mirror)]
    mirrors: Vec<(String, String)>,
    /// A P2P agent (e.g. Dragonfly's dfdaemon) used as an HTTP proxy for every layer blob
    /// request (`http://host:port`); when it fails, lsmd goes to the registry.
    #[arg(long, value_name = "URL")]
    p2p_proxy: Option<String>,
    /// Piece size the P2P agent's requests are widened to (bytes; default 4 MiB, Dragonfly's).
    #[arg(long, value_name = "BYTES", requires = "p2p_proxy", default_value_t = 4 << 20)]
    p2p_piece_size: u64,
}

/// `HOST[:PORT]=URL` of `--mirror`.
fn parse_mirror(s: &str) -> Result<(String, String), String> {
    let (host, url) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: want HOST[:PORT]=http(s)://mirror[:port]"))?;
    if host.is_empty() || host.contains('/') {
        return Err(format!("{s:?}: {host:?} is not a registry host[:port]"));
    }
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!(
            "{s:?}: the mirror {url:?} is not an http(s):// URL"
        ));
    }
    Ok((host.to_string(), url.trim_end_matches('/').to_string()))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(&cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(cli: &Cli) -> Result<(), String> {
    std::fs::create_dir_all(&cli.root)
        .map_err(|e| format!("create root {}: {e}", cli.root.display()))?;
    let abs = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
    let options = lsm::LsmOptions {
        plain_http: cli.plain_http.clone(),
        registry_ca: cli.registry_ca.as_ref().map(abs),
        cache_dir: cli.cache_dir.as_ref().map(abs),
        read_ahead_kb: cli.read_ahead_kb,
        mirrors: cli.mirrors.clone(),
        p2p: cli.p2p_proxy.clone().map(|proxy| lsm::P2p {
            proxy,
            piece_size: cli.p2p_piece_size,
        }),
    };
    let service = snapshots::Service::open(&abs(&cli.root), options)?;
    let listener = bind(&cli.socket)?;
    tracing::info!(socket = %cli.socket.display(), root = %cli.root.display(), "serving containerd snapshots API");
    let result = Server::builder()
        .add_service(containerd_snapshots::server(Arc::new(service)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown_signal())
        .await;
    let _ = std::fs::remove_file(&cli.socket);
    result.map_err(|e| format!("serving {}: {e}", cli.socket.display()))?;
    tracing::info!("stopped");
    Ok(())
}

/// Binds `path`, replacing a socket left by an earlier run (never a file of another type).
fn bind(path: &Path) -> Result<UnixListener, String> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => std::fs::remove_file(path)
            .map_err(|e| format!("remove stale socket {}: {e}", path.display()))?,
        Ok(_) => {
            return Err(format!(
                "{} exists and is not a socket: refusing to replace it",
                path.display()
            ))
        }
        Err(_) => {}
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    }
    UnixListener::bind(path).map_err(|e| format!("bind {}: {e}", path.display()))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install SIGTERM/SIGINT handlers: stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
}

//! The containerd side of `lsmctl pull`: its gRPC API through the maintained `containerd-client`
//! crate. Every request carries the namespace and the pull's lease (so nothing it writes is
//! garbage collected before the image record refers to it), as containerd's own client does.

use std::collections::HashMap;

use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    ApplyRequest, CreateImageRequest, CreateRequest, DeleteRequest, GetImageRequest, Image, Info,
    InfoRequest, UpdateImageRequest, UpdateRequest, WriteAction, WriteContentRequest,
};
use containerd_client::tonic::{Code, Request, Status};
use containerd_client::types::{Descriptor, Mount};
use containerd_client::Client;

use crate::cli::{CliError, CliResult};

/// Bytes per content write message (containerd accepts up to 16 MiB per message).
const WRITE_CHUNK: usize = 1 << 20;

/// A connection to containerd in one namespace, under one lease.
pub struct Containerd {
    client: Client,
    namespace: String,
    lease: Option<String>,
    pub snapshotter: String,
}

/// A gRPC error for a human: which call, and what containerd said.
pub fn grpc(what: &str, s: Status) -> CliError {
    CliError(format!(
        "containerd {what}: {} ({:?})",
        s.message(),
        s.code()
    ))
}

/// Seconds since the epoch as RFC 3339 UTC (containerd's `gc.expire` label format).
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Nanoseconds since the epoch, for unique keys.
pub fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

impl Containerd {
    /// Connects to the socket at `address`.
    pub async fn connect(address: &str, namespace: &str, snapshotter: &str) -> CliResult<Self> {
        let client = Client::from_path(address).await.map_err(|e| {
            CliError(format!(
                "containerd at {address}: {e} (is it running? --address)"
            ))
        })?;
        Ok(Containerd {
            client,
            namespace: namespace.to_string(),
            lease: None,
            snapshotter: snapshotter.to_string(),
        })
    }

    /// `msg` with the namespace and lease headers.
    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        let md = r.metadata_mut();
        if let Ok(v) = self.namespace.parse() {
            md.insert("containerd-namespace", v);
        }
        if let Some(v) = self.lease.as_ref().and_then(|l| l.parse().ok()) {
            md.insert("containerd-lease", v);
        }
        r
    }

    /// Takes a lease that expires by itself in an hour should this process die.
    pub async fn take_lease(&mut self) -> CliResult {
        let id = format!("lsmctl-pull-{}", now_nanos());
        let expire = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default()
            + 3600;
        let labels = HashMap::from([("containerd.io/gc.expire".to_string(), rfc3339(expire))]);
        self.client
            .leases()
            .create(self.req(CreateRequest {
                id: id.clone(),
                labels,
            }))
            .await
            .map_err(|s| grpc("create lease", s))?;
        self.lease = Some(id);
        Ok(())
    }

    /// Lets go of the lease: what the image record refers to stays, the rest is collected.
    pub async fn release_lease(&mut self) -> CliResult {
        if let Some(id) = self.lease.take() {
            self.client
                .leases()
                .delete(self.req(DeleteRequest { id, sync: false }))
                .await
                .map_err(|s| grpc("delete lease", s))?;
        }
        Ok(())
    }

    /// Whether the content store has `digest`.
    async fn content_exists(&self, digest: &str) -> CliResult<bool> {
        match self
            .client
            .content()
            .info(self.req(InfoRequest {
                digest: digest.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(grpc(&format!("content info {digest}"), s)),
        }
    }

    /// Sets `labels` on content that is already in the store.
    async fn label_content(&self, digest: &str, labels: HashMap<String, String>) -> CliResult {
        if labels.is_empty() {
            return Ok(());
        }
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        self.client
            .content()
            .update(self.req(UpdateRequest {
                info: Some(Info {
                    digest: digest.to_string(),
                    labels,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths }),
            }))
            .await
            .map_err(|s| grpc(&format!("label content {digest}"), s))?;
        Ok(())
    }

    /// Puts `bytes` (digest `digest`) into the content store with `labels`, or only labels it
    /// when it is there already.
    pub async fn put_content(
        &self,
        digest: &str,
        bytes: Vec<u8>,
        labels: HashMap<String, String>,
    ) -> CliResult {
        if self.content_exists(digest).await? {
            return self.label_content(digest, labels).await;
        }
        let total = bytes.len() as i64;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let writer = self.write_content(digest, total, labels, rx);
        let feed = async move {
            let _ = tx.send(Ok(bytes)).await;
        };
        let (r, ()) = tokio::join!(writer, feed);
        r
    }

    /// Whether the content store has `digest`; labels it if so.
    pub async fn have_content(
        &self,
        digest: &str,
        labels: HashMap<String, String>,
    ) -> CliResult<bool> {
        if self.content_exists(digest).await? {
            self.label_content(digest, labels).await?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Writes content of `total` bytes whose pieces come from `chunks` (an `Err` piece aborts),
    /// committing it as `digest` with `labels`; containerd checks size and digest.
    pub async fn write_content(
        &self,
        digest: &str,
        total: i64,
        labels: HashMap<String, String>,
        mut chunks: tokio::sync::mpsc::Receiver<Result<Vec<u8>, String>>,
    ) -> CliResult {
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteContentRequest>(4);
        let reference = format!("lsmctl-pull-{digest}");
        let mut write = self.client.content();
        let call = write.write(self.req(tokio_stream::wrappers::ReceiverStream::new(rx)));
        let feed = async move {
            let mut offset = 0i64;
            let mut pending: Vec<u8> = Vec::new();
            loop {
                let next = chunks.recv().await;
                let done = next.is_none();
                match next {
                    Some(Ok(b)) => pending.extend_from_slice(&b),
                    Some(Err(e)) => return Err(CliError(e)),
                    None => {}
                }
                while pending.len() >= WRITE_CHUNK || (done && !pending.is_empty()) {
                    let n = pending.len().min(WRITE_CHUNK);
                    let data: Vec<u8> = pending.drain(..n).collect();
                    let last = done && pending.is_empty() && offset + n as i64 == total;
                    let msg = WriteContentRequest {
                        action: if last {
                            WriteAction::Commit
                        } else {
                            WriteAction::Write
                        } as i32,
                        r#ref: reference.clone(),
                        total,
                        expected: digest.to_string(),
                        offset,
                        data,
                        labels: if last { labels.clone() } else { HashMap::new() },
                    };
                    offset += n as i64;
                    if tx.send(msg).await.is_err() {
                        // containerd ended the call; its answer says why.
                        return Ok(false);
                    }
                    if last {
                        return Ok(true);
                    }
                }
                if done {
                    break;
                }
            }
            if offset != total {
                return Err(CliError(format!(
                    "blob {digest}: the registry sent {offset} bytes, the manifest says {total}"
                )));
            }
            // Empty content: one commit without data.
            let msg = WriteContentRequest {
                action: WriteAction::Commit as i32,
                r#ref: reference.clone(),
                total,
                expected: digest.to_string(),
                offset,
                data: Vec::new(),
                labels: labels.clone(),
            };
            let _ = tx.send(msg).await;
            Ok(true)
        };
        let (answer, fed) = tokio::join!(
            async {
                let mut responses = call.await?.into_inner();
                while responses.message().await?.is_some() {}
                Ok::<(), Status>(())
            },
            feed
        );
        fed?;
        match answer {
            Ok(()) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => Ok(()),
            Err(s) => Err(grpc(&format!("write content {digest}"), s)),
        }
    }

    /// Whether snapshot `key` exists.
    pub async fn snapshot_exists(&self, key: &str) -> CliResult<bool> {
        match self
            .client
            .snapshots()
            .stat(self.req(StatSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(grpc(&format!("stat snapshot {key}"), s)),
        }
    }

    /// Prepares `key` over `parent`: `Ok(None)` when the snapshotter answered ALREADY_EXISTS
    /// (it made the snapshot named by the `containerd.io/snapshot.ref` label itself).
    pub async fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> CliResult<Option<Vec<Mount>>> {
        match self
            .client
            .snapshots()
            .prepare(self.req(PrepareSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.to_string(),
                parent: parent.to_string(),
                labels,
            }))
            .await
        {
            Ok(r) => Ok(Some(r.into_inner().mounts)),
            Err(s) if s.code() == Code::AlreadyExists => Ok(None),
            Err(s) => Err(grpc(&format!("prepare snapshot {key:?} on {parent:?}"), s)),
        }
    }

    /// Commits active snapshot `key` as `name`; a `name` made meanwhile by another pull counts.
    pub async fn commit(
        &self,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> CliResult {
        match self
            .client
            .snapshots()
            .commit(self.req(CommitSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                name: name.to_string(),
                key: key.to_string(),
                labels,
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => self.remove(key).await,
            Err(s) => Err(grpc(&format!("commit snapshot {key:?} as {name}"), s)),
        }
    }

    /// Removes snapshot `key`.
    pub async fn remove(&self, key: &str) -> CliResult {
        self.client
            .snapshots()
            .remove(self.req(RemoveSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.to_string(),
            }))
            .await
            .map_err(|s| grpc(&format!("remove snapshot {key:?}"), s))?;
        Ok(())
    }

    /// Applies layer `diff` (in the content store) onto `mounts`; returns the digest of the
    /// uncompressed tar (the layer's diff_id).
    pub async fn apply(&self, diff: Descriptor, mounts: Vec<Mount>) -> CliResult<String> {
        let digest = diff.digest.clone();
        let r = self
            .client
            .diff()
            .apply(self.req(ApplyRequest {
                diff: Some(diff),
                mounts,
                payloads: HashMap::new(),
            }))
            .await
            .map_err(|s| grpc(&format!("apply layer {digest}"), s))?;
        Ok(r.into_inner().applied.map(|d| d.digest).unwrap_or_default())
    }

    /// Creates image record `name` pointing at `target`, or points the existing one there.
    pub async fn set_image(&self, name: &str, target: Descriptor) -> CliResult {
        let mut images = self.client.images();
        let existing = match images
            .get(self.req(GetImageRequest {
                name: name.to_string(),
            }))
            .await
        {
            Ok(r) => r.into_inner().image,
            Err(s) if s.code() == Code::NotFound => None,
            Err(s) => return Err(grpc(&format!("get image {name}"), s)),
        };
        let image = Image {
            name: name.to_string(),
            target: Some(target),
            ..Default::default()
        };
        match existing {
            Some(_) => images
                .update(self.req(UpdateImageRequest {
                    image: Some(image),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["target".into()],
                    }),
                }))
                .await
                .map(|_| ())
                .map_err(|s| grpc(&format!("update image {name}"), s)),
            None => images
                .create(self.req(CreateImageRequest { image: Some(image) }))
                .await
                .map(|_| ())
                .map_err(|s| grpc(&format!("create image {name}"), s)),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_796_259_661), "2026-12-03T01:01:01Z");
    }
}

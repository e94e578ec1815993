//! A registry blob source: builds the [`HttpBlob`] a `"registry"` layer config names (its
//! mirrors, credentials, TLS trust and P2P agent), counted in the host's registry metrics.

use std::sync::Arc;

use super::http::{ClientOptions, HttpBlob, P2pAgent};
use super::{tls, Site};
use crate::config::{HostServices, RegistryConfig};

impl RegistryConfig {
    /// Opens the blob `site.digest` of this repository.
    pub fn open(
        &self,
        site: &Site,
        host: &HostServices,
    ) -> std::io::Result<Arc<dyn blockfmt::ReadAt>> {
        let client = ClientOptions {
            tls: tls::client_config(site.ca_file(self.ca_file.as_ref(), host).as_deref())?,
            credential_hosts: self.credential_hosts(),
        };
        let blob = HttpBlob::registry(
            &self.mirrors(),
            &self.repository,
            site.digest.unwrap_or_default(),
            self.size,
            host.retry,
            host.registry_stats.clone(),
            &host.registry_auth,
            &client,
        )?;
        Ok(Arc::new(match &self.p2p {
            // (the P2P agent only fronts registry blobs)
            Some(p) => blob.via_p2p(P2pAgent {
                proxy: p.proxy.clone(),
                piece_size: p.piece_size,
            })?,
            None => blob,
        }))
    }
}

//! A blob at a plain HTTP(S) URL that honours Range (object storage, presigned URLs), with
//! mirrors: builds the [`HttpBlob`] an `"http"` layer config names, counted in the host's HTTP
//! metrics. No credentials are ever sent.

use std::sync::Arc;

use super::http::{ClientOptions, HttpBlob, Mirror};
use super::{tls, Site};
use crate::config::{HostServices, HttpConfig};

impl HttpConfig {
    /// Opens the blob at this URL (or its mirrors).
    pub fn open(
        &self,
        site: &Site,
        host: &HostServices,
    ) -> std::io::Result<Arc<dyn blockfmt::ReadAt>> {
        let urls: Vec<Mirror> = std::iter::once(&self.url)
            .chain(&self.mirrors)
            .map(|u| Mirror {
                base: u.clone(),
                credentials: None,
            })
            .collect();
        let client = ClientOptions {
            tls: tls::client_config(site.ca_file(self.ca_file.as_ref(), host).as_deref())?,
            credential_hosts: Vec::new(),
        };
        Ok(Arc::new(HttpBlob::urls(
            site.name.to_string(),
            &urls,
            self.size,
            host.retry,
            host.sources.register("http"),
            &client,
        )?))
    }
}

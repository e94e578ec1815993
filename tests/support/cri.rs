//! A CRI client (Kubernetes' image service, `runtime.v1`) from the maintained `k8s-cri` crate
//! over tonic, talking to containerd's CRI plugin on containerd's socket — what the kubelet
//! does to pull an image.

use std::path::Path;

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{ImageSpec, PullImageRequest};

/// CRI `PullImage` of `image` through containerd at `address`; returns the image ref CRI
/// answers (the image id), or the error message.
pub fn pull_image(address: &Path, image: &str) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let path = address.to_path_buf();
    rt.block_on(async move {
        let channel = tonic::transport::Endpoint::try_from("http://[::]")
            .map_err(|e| e.to_string())?
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                tokio::net::UnixStream::connect(path.clone())
            }))
            .await
            .map_err(|e| format!("connect to CRI: {e}"))?;
        let mut client = ImageServiceClient::new(channel);
        let r = client
            .pull_image(PullImageRequest {
                image: Some(ImageSpec {
                    image: image.to_string(),
                    annotations: Default::default(),
                }),
                auth: None,
                sandbox_config: None,
            })
            .await
            .map_err(|s| format!("PullImage {image}: {} ({:?})", s.message(), s.code()))?;
        Ok(r.into_inner().image_ref)
    })
}

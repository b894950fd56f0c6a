//! The JSON documents of OCI / Docker v2 images: indexes, manifests, configs.

use serde::Deserialize;

use crate::platform::Platform;
use crate::reference::Digest;

const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// The `Accept` header for manifest requests: OCI index, Docker manifest
/// list, OCI manifest, Docker v2 manifest. Without the v2 types Docker Hub
/// falls back to schema 1, which we do not read.
pub(crate) const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// Manifests and configs are small; a registry sending more is broken or hostile.
pub(crate) const MAX_MANIFEST_SIZE: u64 = 4 << 20;
pub(crate) const MAX_CONFIG_SIZE: u64 = 32 << 20;

/// A content descriptor (OCI image spec, descriptor.md).
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: i64,
    #[serde(default)]
    pub platform: Option<Platform>,
}

impl Descriptor {
    pub fn digest(&self) -> Result<Digest, String> {
        Digest::parse(&self.digest)
    }

    pub fn size(&self) -> Result<u64, String> {
        u64::try_from(self.size)
            .map_err(|_| format!("descriptor {} has a negative size", self.digest))
    }
}

/// Either kind of top-level document a manifest endpoint can return.
pub(crate) enum Document {
    Index(Vec<Descriptor>),
    Manifest(ImageManifest),
}

#[derive(Clone, Debug, Deserialize)]
pub(crate) struct ImageManifest {
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// Every field any of the four formats may have, to classify by shape:
/// registries are not consistent about `mediaType` and `Content-Type`.
#[derive(Deserialize)]
struct Probe {
    #[serde(rename = "schemaVersion")]
    schema_version: Option<u32>,
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    manifests: Option<Vec<Descriptor>>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
}

/// Classifies and parses a manifest-endpoint body. `content_type` is the
/// response header, used only when the body does not say.
pub(crate) fn parse_document(body: &[u8], content_type: &str) -> Result<Document, String> {
    let probe: Probe =
        serde_json::from_slice(body).map_err(|e| format!("manifest is not valid JSON: {e}"))?;
    if probe.schema_version == Some(1) {
        return Err("it uses the Docker schema 1 manifest format, which is not supported; re-push it with a current \
                    tool"
            .into());
    }
    let media_type = probe.media_type.as_deref().unwrap_or(content_type);
    let media_type = media_type.split(';').next().unwrap_or("").trim();
    match (probe.manifests, probe.config, probe.layers) {
        (Some(manifests), _, _) => Ok(Document::Index(manifests)),
        (None, Some(config), Some(layers)) => {
            if media_type.contains("artifact") {
                return Err(format!(
                    "it is an artifact ({media_type}), not a container image"
                ));
            }
            if config.media_type != OCI_CONFIG && config.media_type != DOCKER_CONFIG {
                return Err(format!(
                    "it is not a container image (config media type `{}`)",
                    if config.media_type.is_empty() {
                        "none"
                    } else {
                        &config.media_type
                    }
                ));
            }
            Ok(Document::Manifest(ImageManifest { config, layers }))
        }
        _ => Err(format!("unrecognised manifest (media type `{media_type}`)")),
    }
}

/// Whether a layer descriptor's media type is a (possibly compressed) tar we
/// can unpack. The compression itself is detected from the bytes.
pub(crate) fn check_layer_media_type(media_type: &str) -> Result<(), String> {
    if media_type.contains("encrypted") {
        return Err(format!(
            "layer media type `{media_type}` is encrypted, which is not supported"
        ));
    }
    if media_type.is_empty()
        || media_type.contains(".tar")
        || media_type.contains("tar+")
        || media_type.ends_with("tar")
    {
        return Ok(());
    }
    Err(format!(
        "layer media type `{media_type}` is not a tar layer"
    ))
}

/// The image configuration JSON (only what running it needs).
#[derive(Debug, Deserialize)]
pub(crate) struct ConfigFile {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
    #[serde(default)]
    pub config: Option<RunConfig>,
    pub rootfs: RootFs,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RunConfig {
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: Option<String>,
    #[serde(rename = "User", default)]
    pub user: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_documents() {
        let index = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:aa","size":1,
             "platform":{"os":"linux","architecture":"arm","variant":"v7"}}]}"#;
        match parse_document(index, "").unwrap() {
            Document::Index(m) => {
                assert_eq!(m.len(), 1);
                assert_eq!(
                    m[0].platform.as_ref().unwrap().variant.as_deref(),
                    Some("v7")
                );
            }
            Document::Manifest(_) => panic!("index parsed as manifest"),
        }
        let manifest = br#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.docker.container.image.v1+json",
            "digest":"sha256:bb","size":2},"layers":[]}"#;
        assert!(matches!(
            parse_document(
                manifest,
                "application/vnd.docker.distribution.manifest.v2+json"
            )
            .unwrap(),
            Document::Manifest(_)
        ));

        let v1 = br#"{"schemaVersion":1,"name":"x","fsLayers":[]}"#;
        assert!(parse_document(v1, "").err().unwrap().contains("schema 1"));
        let helm = br#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.cncf.helm.config.v1+json",
            "digest":"sha256:bb","size":2},"layers":[]}"#;
        assert!(parse_document(helm, "")
            .err()
            .unwrap()
            .contains("not a container image"));
        assert!(parse_document(b"<html>", "text/html").is_err());
    }

    #[test]
    fn layer_media_types() {
        for ok in [
            "application/vnd.oci.image.layer.v1.tar",
            "application/vnd.oci.image.layer.v1.tar+gzip",
            "application/vnd.oci.image.layer.v1.tar+zstd",
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        ] {
            assert!(check_layer_media_type(ok).is_ok(), "{ok}");
        }
        assert!(
            check_layer_media_type("application/vnd.oci.image.layer.v1.tar+gzip+encrypted")
                .is_err()
        );
        assert!(check_layer_media_type("application/json").is_err());
    }
}

//! The image config (FORMAT.md §4): one JSON file describing an image's size, its layers bottom
//! first, and its upper layer. Loading rejects unknown fields and names the bad field; saving is
//! atomic (write, fsync, rename) so a crash never leaves half a config.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockfmt::format::parse_oci_digest;
use blockfmt::{Image, Layer, LayerStack, UpperLayer};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where a layer blob's bytes come from. Later sources (registry, NAS, P2P) are new variants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum SourceConfig {
    /// A local file; relative paths are relative to the config file.
    Local(PathBuf),
}

/// One layer of the stack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerConfig {
    pub source: SourceConfig,
    /// OCI digest of the whole blob (`sha256:…`), checked by `lsmctl verify`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Metadata digest (`sha256:…`), checked at every open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta_digest: Option<String>,
}

fn default_chunk_size() -> u32 {
    blockfmt::writer::DEFAULT_CHUNK_SIZE
}
fn default_level() -> i32 {
    blockfmt::chunk::DEFAULT_LEVEL
}
fn default_cache() -> usize {
    blockfmt::stack::DEFAULT_CACHE_BYTES
}

/// An image config; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Layers, bottom first.
    #[serde(default)]
    pub layers: Vec<LayerConfig>,
    /// Upper layer directory; absent = read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upper: Option<PathBuf>,
    /// Chunk window for layers committed from this image.
    #[serde(default = "default_chunk_size")]
    pub chunk_size: u32,
    /// zstd level for committed layers; 0 = store uncompressed.
    #[serde(default = "default_level")]
    pub compression_level: i32,
    /// Bound of the in-memory decoded-chunk cache, bytes.
    #[serde(default = "default_cache")]
    pub cache_bytes: usize,
}

impl ImageConfig {
    /// A config with defaults for everything but size, layers and upper.
    pub fn new(size: u64, layers: Vec<LayerConfig>, upper: Option<PathBuf>) -> Self {
        ImageConfig {
            size,
            layers,
            upper,
            chunk_size: default_chunk_size(),
            compression_level: default_level(),
            cache_bytes: default_cache(),
        }
    }

    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<ImageConfig> {
        let bad = |detail: String| Error::Config {
            path: path.to_path_buf(),
            detail,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let c: ImageConfig = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        c.check().map_err(bad)?;
        Ok(c)
    }

    /// Checks the fields serde cannot.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.size == 0 {
            return Err("field `size`: must be greater than 0".into());
        }
        blockfmt::format::check_chunk_size(self.chunk_size)
            .map_err(|e| format!("field `chunk_size`: {e}"))?;
        if !(0..=22).contains(&self.compression_level) {
            return Err("field `compression_level`: must be 0 (none) or 1..=22".into());
        }
        for (i, l) in self.layers.iter().enumerate() {
            for (name, d) in [("digest", &l.digest), ("meta_digest", &l.meta_digest)] {
                if let Some(d) = d {
                    parse_oci_digest(d).map_err(|e| format!("field `layers[{i}].{name}`: {e}"))?;
                }
            }
        }
        Ok(())
    }

    /// Writes the config atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut text = serde_json::to_string_pretty(self).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        text.push('\n');
        let tmp = path.with_extension("json.tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(text.as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(io)?;
        if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(d)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        Ok(())
    }

    /// Compression settings for layers written from this image.
    pub fn writer_options(&self) -> blockfmt::WriterOptions {
        blockfmt::WriterOptions {
            chunk_size: self.chunk_size,
            compression: match self.compression_level {
                0 => blockfmt::Compression::None,
                l => blockfmt::Compression::Zstd(l),
            },
            ..Default::default()
        }
    }
}

/// An image config together with where it lives (relative paths resolve against its folder).
#[derive(Debug, Clone)]
pub struct ImageSpec {
    pub path: PathBuf,
    pub config: ImageConfig,
}

impl ImageSpec {
    /// Loads the config at `path`.
    pub fn load(path: &Path) -> Result<ImageSpec> {
        Ok(ImageSpec {
            path: path.to_path_buf(),
            config: ImageConfig::load(path)?,
        })
    }

    /// Resolves a path from the config.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        match self.path.parent() {
            Some(d) if p.is_relative() => d.join(p),
            _ => p.to_path_buf(),
        }
    }

    /// The local path of layer `i`.
    pub fn layer_path(&self, i: usize) -> Option<PathBuf> {
        self.config.layers.get(i).map(|l| match &l.source {
            SourceConfig::Local(p) => self.resolve(p),
        })
    }

    /// The upper layer directory, if any.
    pub fn upper_dir(&self) -> Option<PathBuf> {
        self.config.upper.as_ref().map(|p| self.resolve(p))
    }

    /// Opens layer `i`, checking its metadata digest if the config gives one.
    pub fn open_layer(&self, i: usize) -> Result<Layer> {
        let (Some(l), Some(path)) = (self.config.layers.get(i), self.layer_path(i)) else {
            return Err(Error::Config {
                path: self.path.clone(),
                detail: format!("no layer {i}"),
            });
        };
        let wrap = |source| Error::Layer {
            index: i,
            path: path.clone(),
            source,
        };
        let f = std::fs::File::open(&path).map_err(|e| Error::Layer {
            index: i,
            path: path.clone(),
            source: blockfmt::Error::Io {
                layer: path.display().to_string(),
                offset: 0,
                source: e,
            },
        })?;
        let meta = match &l.meta_digest {
            Some(d) => Some(parse_oci_digest(d).map_err(|detail| Error::Config {
                path: self.path.clone(),
                detail,
            })?),
            None => None,
        };
        Layer::open(path.display().to_string(), Arc::new(f), meta).map_err(wrap)
    }

    /// Opens the lower layers as a stack.
    pub fn open_stack(&self) -> Result<LayerStack> {
        let layers = (0..self.config.layers.len())
            .map(|i| self.open_layer(i))
            .collect::<Result<Vec<_>>>()?;
        Ok(LayerStack::new(
            layers,
            self.config.size,
            self.config.cache_bytes,
        )?)
    }

    /// Opens the whole image; with `writable`, opens (or creates) the upper layer too.
    pub fn open_image(&self, writable: bool) -> Result<Image> {
        let stack = self.open_stack()?;
        let upper = match (writable, self.upper_dir()) {
            (true, Some(dir)) => Some(UpperLayer::open(&dir, self.config.size)?.0),
            _ => None,
        };
        Ok(Image::new(stack, upper)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_configs_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.json");
        for (text, want) in [
            (r#"{"size": 0}"#, "size"),
            (r#"{"size": 1, "layrs": []}"#, "layrs"),
            (r#"{"size": 1, "chunk_size": 1000}"#, "chunk_size"),
            (
                r#"{"size": 1, "layers": [{"source": {"ftp": "x"}}]}"#,
                "ftp",
            ),
            (
                r#"{"size": 1, "layers": [{"source": {"local": "x"}, "digest": "md5:1"}]}"#,
                "layers[0].digest",
            ),
            (r#"{"size": "#, "EOF"),
        ] {
            std::fs::write(&p, text).unwrap();
            let e = ImageConfig::load(&p).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("c.json"), "{text}: {e}");
        }
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.json");
        let c = ImageConfig::new(
            1 << 20,
            vec![LayerConfig {
                source: SourceConfig::Local("a.blob".into()),
                digest: None,
                meta_digest: None,
            }],
            Some("upper".into()),
        );
        c.save(&p).unwrap();
        assert_eq!(ImageConfig::load(&p).unwrap(), c);
    }
}

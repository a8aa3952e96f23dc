//! Writing safetensors shards one tensor at a time.
//!
//! A safetensors header lists every tensor's dtype, shape and byte range before the data, and
//! the plan knows all of them before the first tensor is merged: so each shard's header is
//! written when the shard is opened and the tensors are appended as they are merged, never
//! held together in memory. Shards are split at `max_shard_bytes` (mergekit's
//! `--out-shard-size`, 5 GB by default) and named and indexed as transformers does.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::config::OutDtype;

/// One tensor the output will hold.
#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    pub dtype: OutDtype,
    pub shape: Vec<usize>,
}

impl Entry {
    fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

/// The shards of an output folder, written in the order of the entries.
pub struct ShardWriter {
    dir: PathBuf,
    /// Per shard: its file name and entries.
    shards: Vec<(String, Vec<Entry>)>,
    shard: usize,
    within: usize,
    /// Values of the current tensor written so far.
    written: usize,
    file: Option<BufWriter<File>>,
}

impl ShardWriter {
    /// Plans the shards of `entries` (in this order) in `dir`.
    pub fn new(dir: &Path, entries: Vec<Entry>, max_shard_bytes: usize) -> Self {
        let mut groups: Vec<Vec<Entry>> = vec![Vec::new()];
        let mut size = 0usize;
        for e in entries {
            let b = e.bytes();
            if size > 0 && size + b > max_shard_bytes {
                groups.push(Vec::new());
                size = 0;
            }
            size += b;
            groups.last_mut().expect("one group").push(e);
        }
        let n = groups.len();
        let shards = groups
            .into_iter()
            .enumerate()
            .map(|(i, g)| {
                let name = if n == 1 {
                    "model.safetensors".to_string()
                } else {
                    format!("model-{:05}-of-{n:05}.safetensors", i + 1)
                };
                (name, g)
            })
            .collect();
        Self {
            dir: dir.to_path_buf(),
            shards,
            shard: 0,
            within: 0,
            written: 0,
            file: None,
        }
    }

    /// The next tensor's entry, if any is left.
    pub fn next_entry(&self) -> Option<&Entry> {
        self.shards.get(self.shard)?.1.get(self.within)
    }

    /// Appends the next tensor, given as f32 values converted here to its dtype.
    pub fn write(&mut self, name: &str, values: &[f32]) -> Result<()> {
        if self.written > 0 {
            bail!("internal: {name:?} written whole after some of its rows")
        }
        self.write_part(name, values, true)
    }

    /// Appends the next values of the next tensor (rows merged in blocks, in order); the
    /// tensor is complete when all its values are written.
    pub fn write_rows(&mut self, name: &str, values: &[f32]) -> Result<()> {
        self.write_part(name, values, false)
    }

    fn write_part(&mut self, name: &str, values: &[f32], whole: bool) -> Result<()> {
        let entry = match self.next_entry() {
            Some(e) if e.name == name => e.clone(),
            other => bail!(
                "internal: writing {name:?} where {:?} was planned",
                other.map(|e| &e.name)
            ),
        };
        let total = entry.shape.iter().product::<usize>();
        let fits = if whole {
            total == values.len()
        } else {
            self.written + values.len() <= total
        };
        if !fits {
            bail!(
                "internal: {name:?} has {} values after {} for shape {:?}",
                values.len(),
                self.written,
                entry.shape
            )
        }
        if self.file.is_none() {
            self.open_shard()?;
        }
        let path = self.dir.join(&self.shards[self.shard].0);
        let f = self.file.as_mut().expect("opened");
        let io = |e| anyhow::Error::new(e).context(format!("writing {}", path.display()));
        match entry.dtype {
            OutDtype::F32 => {
                for chunk in values.chunks(1 << 16) {
                    let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
                    f.write_all(&bytes).map_err(io)?;
                }
            }
            OutDtype::Bf16 | OutDtype::F16 => {
                for chunk in values.chunks(1 << 16) {
                    let bytes: Vec<u8> = chunk
                        .iter()
                        .flat_map(|v| match entry.dtype {
                            OutDtype::Bf16 => half::bf16::from_f32(*v).to_le_bytes(),
                            _ => half::f16::from_f32(*v).to_le_bytes(),
                        })
                        .collect();
                    f.write_all(&bytes).map_err(io)?;
                }
            }
        }
        self.written += values.len();
        if self.written < total {
            return Ok(());
        }
        self.written = 0;
        self.within += 1;
        if self.within == self.shards[self.shard].1.len() {
            self.close_shard()?;
        }
        Ok(())
    }

    fn open_shard(&mut self) -> Result<()> {
        let (file_name, entries) = &self.shards[self.shard];
        let path = self.dir.join(file_name);
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut offset = 0usize;
        for e in entries {
            let end = offset + e.bytes();
            header.insert(
                e.name.clone(),
                json!({
                    "dtype": format!("{:?}", e.dtype.safetensors()),
                    "shape": e.shape,
                    "data_offsets": [offset, end],
                }),
            );
            offset = end;
        }
        let mut text = serde_json::to_string(&header)?.into_bytes();
        // The data starts 8-byte aligned, as the safetensors crate writes it.
        while (text.len() + 8) % 8 != 0 {
            text.push(b' ');
        }
        let f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut f = BufWriter::with_capacity(1 << 20, f);
        f.write_all(&(text.len() as u64).to_le_bytes())
            .and_then(|_| f.write_all(&text))
            .with_context(|| format!("writing {}", path.display()))?;
        self.file = Some(f);
        Ok(())
    }

    fn close_shard(&mut self) -> Result<()> {
        if let Some(f) = self.file.take() {
            let path = self.dir.join(&self.shards[self.shard].0);
            let f = f
                .into_inner()
                .map_err(|e| e.into_error())
                .with_context(|| format!("writing {}", path.display()))?;
            f.sync_all()
                .with_context(|| format!("syncing {}", path.display()))?;
        }
        self.shard += 1;
        self.within = 0;
        Ok(())
    }

    /// Checks every planned tensor was written and writes the index of a sharded output.
    pub fn finish(self) -> Result<usize> {
        if let Some(e) = self.next_entry() {
            bail!("internal: tensor {:?} was planned but not written", e.name)
        }
        if self.shards.len() > 1 {
            let mut map = BTreeMap::new();
            let mut total = 0usize;
            for (file, entries) in &self.shards {
                for e in entries {
                    map.insert(e.name.clone(), file.clone());
                    total += e.bytes();
                }
            }
            let index = json!({"metadata": {"total_size": total}, "weight_map": map});
            crate::util::atomic::write_bytes_atomic(
                &self.dir.join("model.safetensors.index.json"),
                (serde_json::to_string_pretty(&index)? + "\n").as_bytes(),
            )?;
        }
        Ok(self.shards.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_valid_safetensors_with_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let entries = vec![
            Entry {
                name: "b".into(),
                dtype: OutDtype::F32,
                shape: vec![2, 3],
            },
            Entry {
                name: "a".into(),
                dtype: OutDtype::Bf16,
                shape: vec![5],
            },
        ];
        let mut w = ShardWriter::new(dir.path(), entries, 24);
        w.write("b", &[1., 2., 3., 4., 5., 6.]).unwrap();
        assert!(w.write("b", &[0.0; 6]).is_err());
        w.write("a", &[0.5, 1.0, 1.5, 2.0, 2.5]).unwrap();
        assert_eq!(w.finish().unwrap(), 2);
        let bytes = std::fs::read(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let a = st.tensor("a").unwrap();
        assert_eq!(a.shape(), &[5]);
        assert_eq!(&a.data()[..2], &half::bf16::from_f32(0.5).to_le_bytes());
        let index =
            std::fs::read_to_string(dir.path().join("model.safetensors.index.json")).unwrap();
        assert!(index.contains("\"b\": \"model-00001-of-00002.safetensors\""));
    }
}

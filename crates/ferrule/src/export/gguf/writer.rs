//! The GGUF v3 container, as gguf-py's `GGUFWriter` writes it: little-endian, the header
//! (magic, version, tensor and key counts), the metadata key/value pairs, the tensor infos
//! (name, dimensions innermost first, type, offset into the data section), padding to the
//! alignment (32, `GGUF_DEFAULT_ALIGNMENT`), then each tensor's data padded to the alignment.
//!
//! Tensor data is written one tensor at a time, through a callback, so that only one converted
//! tensor is held in memory; the file is written atomically.

use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::quant::ggml_quantize::GgmlWriteType;

/// `GGUF_DEFAULT_ALIGNMENT`: where tensor data starts, and every tensor's data with it.
pub const ALIGNMENT: usize = 32;
const VERSION: u32 = 3;

/// A metadata value, in the GGUF value types llama.cpp's converters use for each key.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    I32Array(Vec<i32>),
}

impl MetaValue {
    /// `gguf_type` ids (gguf.h).
    fn type_id(&self) -> u32 {
        match self {
            Self::U32(_) => 4,
            Self::F32(_) => 6,
            Self::Bool(_) => 7,
            Self::Str(_) => 8,
            Self::StrArray(_) | Self::I32Array(_) => 9,
        }
    }

    fn write_to(&self, b: &mut Vec<u8>) {
        b.extend(self.type_id().to_le_bytes());
        match self {
            Self::U32(x) => b.extend(x.to_le_bytes()),
            Self::F32(x) => b.extend(x.to_le_bytes()),
            Self::Bool(x) => b.push(u8::from(*x)),
            Self::Str(s) => put_str(b, s),
            Self::StrArray(xs) => {
                b.extend(8u32.to_le_bytes());
                b.extend((xs.len() as u64).to_le_bytes());
                xs.iter().for_each(|s| put_str(b, s));
            }
            Self::I32Array(xs) => {
                b.extend(5u32.to_le_bytes());
                b.extend((xs.len() as u64).to_le_bytes());
                xs.iter().for_each(|x| b.extend(x.to_le_bytes()));
            }
        }
    }
}

/// How many of `infos` have each tensor type, by ggml's type name (the export report's
/// `tensor_types`).
pub fn count_types(infos: &[TensorInfo]) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for info in infos {
        *counts.entry(info.ty.name().to_string()).or_default() += 1;
    }
    counts
}

/// One tensor's entry in the header.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in HF (row-major) order, outermost first; the file stores them reversed.
    pub shape: Vec<usize>,
    pub ty: GgmlWriteType,
}

impl TensorInfo {
    /// Bytes of this tensor's data.
    pub fn nbytes(&self) -> usize {
        self.ty.bytes_for(self.shape.iter().product())
    }
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

fn padding(len: usize) -> usize {
    len.next_multiple_of(ALIGNMENT) - len
}

/// The header, metadata and tensor infos, padded to the alignment: everything before the data.
pub fn header_bytes(metadata: &[(String, MetaValue)], tensors: &[TensorInfo]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(VERSION.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_str(&mut b, key);
        value.write_to(&mut b);
    }
    let mut offset = 0usize;
    for t in tensors {
        put_str(&mut b, &t.name);
        b.extend((t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            b.extend((*d as u64).to_le_bytes());
        }
        b.extend(t.ty.id().to_le_bytes());
        b.extend((offset as u64).to_le_bytes());
        offset += t.nbytes() + padding(t.nbytes());
    }
    b.resize(b.len() + padding(b.len()), 0);
    b
}

/// Writes a GGUF file at `path` atomically: `data(i)` gives tensor `i`'s bytes, called once per
/// tensor in order. On any error nothing is left at `path` (an existing file is kept).
pub fn write_gguf(
    path: &Path,
    metadata: &[(String, MetaValue)],
    tensors: &[TensorInfo],
    mut data: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for t in tensors {
        if !seen.insert(&t.name) {
            bail!("GGUF export: tensor {:?} would be written twice", t.name)
        }
    }
    let header = header_bytes(metadata, tensors);
    // The callback's own error, kept whole (io::Error would flatten its context chain).
    let mut failure: Option<anyhow::Error> = None;
    let written = crate::util::atomic::write_atomic(path, |f| {
        let mut w = BufWriter::with_capacity(1 << 20, f);
        w.write_all(&header)?;
        for (i, t) in tensors.iter().enumerate() {
            let bytes = match data(i) {
                Ok(b) if b.len() == t.nbytes() => b,
                Ok(b) => {
                    failure = Some(anyhow::anyhow!(
                        "GGUF export: tensor {:?} produced {} bytes, its header says {}",
                        t.name,
                        b.len(),
                        t.nbytes()
                    ));
                    return Err(std::io::Error::other("tensor size"));
                }
                Err(e) => {
                    failure = Some(e);
                    return Err(std::io::Error::other("tensor data"));
                }
            };
            w.write_all(&bytes)?;
            w.write_all(&vec![0u8; padding(bytes.len())])?;
        }
        w.flush()
    });
    match (written, failure) {
        (_, Some(e)) => Err(e),
        (Err(e), None) => Err(e).with_context(|| format!("writing {}", path.display())),
        (Ok(()), None) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file;

    #[test]
    fn candle_reads_what_we_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let md = vec![
            (
                "general.architecture".to_string(),
                MetaValue::Str("llama".into()),
            ),
            ("a.u32".to_string(), MetaValue::U32(7)),
            ("a.f32".to_string(), MetaValue::F32(1e-5)),
            ("a.bool".to_string(), MetaValue::Bool(true)),
            (
                "a.strs".to_string(),
                MetaValue::StrArray(vec!["x".into(), "yz".into()]),
            ),
            ("a.i32s".to_string(), MetaValue::I32Array(vec![1, -3])),
        ];
        let tensors = vec![
            TensorInfo {
                name: "v".into(),
                shape: vec![3],
                ty: GgmlWriteType::F32,
            },
            TensorInfo {
                name: "m".into(),
                shape: vec![2, 32],
                ty: GgmlWriteType::Q8_0,
            },
        ];
        let vals: Vec<f32> = (0..64).map(|i| i as f32 / 8.0 - 4.0).collect();
        write_gguf(&path, &md, &tensors, |i| {
            Ok(match i {
                0 => GgmlWriteType::F32.encode(&[1.0, 2.0, 3.0]),
                _ => GgmlWriteType::Q8_0.encode(&vals),
            })
        })
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let c = gguf_file::Content::read(&mut std::io::Cursor::new(&bytes)).unwrap();
        assert_eq!(c.tensor_data_offset as usize % ALIGNMENT, 0);
        assert_eq!(
            c.metadata["a.strs"].to_vec().unwrap().len(),
            2,
            "string array"
        );
        assert_eq!(c.metadata["a.u32"].to_u32().unwrap(), 7);
        assert!(c.metadata["a.bool"].to_bool().unwrap());
        let m = &c.tensor_infos["m"];
        assert_eq!(m.shape.dims(), &[2, 32]);
        assert_eq!(m.offset as usize % ALIGNMENT, 0);
        let q = c
            .tensor(
                &mut std::io::Cursor::new(&bytes),
                "m",
                &candle_core::Device::Cpu,
            )
            .unwrap();
        let back: Vec<f32> = q
            .dequantize(&candle_core::Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(
            back,
            GgmlWriteType::Q8_0.decode(&GgmlWriteType::Q8_0.encode(&vals))
        );
        assert_eq!(bytes.len() % ALIGNMENT, 0);
    }

    #[test]
    fn a_failing_tensor_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let tensors = vec![TensorInfo {
            name: "v".into(),
            shape: vec![3],
            ty: GgmlWriteType::F32,
        }];
        let err = write_gguf(&path, &[], &tensors, |_| bail!("boom in v")).unwrap_err();
        assert!(err.to_string().contains("boom in v"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}

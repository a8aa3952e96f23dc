//! GGUF tensor type names, and a header scan that names a type candle cannot read.

#[allow(unused_imports)]
use super::*;

/// llama.cpp's name for a GGUF tensor type.
pub fn ggml_type_name(dt: GgmlDType) -> &'static str {
    match dt {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// llama.cpp's name for a GGUF type id (ggml.h `ggml_type`), including those candle lacks.
pub(super) fn ggml_type_id_name(id: u32) -> String {
    const NAMES: [&str; 42] = [
        "F32",
        "F16",
        "Q4_0",
        "Q4_1",
        "Q4_2",
        "Q4_3",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q8_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ3_XXS",
        "IQ1_S",
        "IQ4_NL",
        "IQ3_S",
        "IQ2_S",
        "IQ4_XS",
        "I8",
        "I16",
        "I32",
        "I64",
        "F64",
        "IQ1_M",
        "BF16",
        "Q4_0_4_4",
        "Q4_0_4_8",
        "Q4_0_8_8",
        "TQ1_0",
        "TQ2_0",
        "IQ4_NL_4_4",
        "IQ4_NL_4_8",
        "IQ4_NL_8_8",
        "MXFP4",
        "NVFP4",
        "Q1_0",
    ];
    NAMES
        .get(id as usize)
        .map(|s| s.to_string())
        .unwrap_or_else(|| format!("unknown type {id}"))
}

// ---------------------------------------------------------------------------------------------
// Header problems
// ---------------------------------------------------------------------------------------------

/// candle's header reader failed: walk the header ourselves to say where and why (a tensor type
/// candle lacks is reported with its name and the tensor's; anything else is truncation or
/// corruption).
pub(super) fn diagnose_header(path: &Path, bytes: &[u8], err: candle_core::Error) -> GgufError {
    match scan_tensor_types(bytes) {
        Ok(types) => {
            for (tensor, id) in types {
                if !candle_knows_type(id) {
                    return GgufError::UnsupportedTensorType {
                        path: path.to_path_buf(),
                        tensor,
                        ggml_type: ggml_type_id_name(id),
                        type_id: id,
                    };
                }
            }
            GgufError::Corrupt {
                path: path.to_path_buf(),
                detail: err.to_string(),
            }
        }
        Err(detail) => GgufError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("{detail} (file is {} bytes; candle: {err})", bytes.len()),
        },
    }
}

pub(super) fn candle_knows_type(id: u32) -> bool {
    matches!(id, 0..=3 | 6..=15 | 30)
}

/// `(tensor name, type id)` from a GGUF header, skipping the metadata values.
pub(super) fn scan_tensor_types(b: &[u8]) -> Result<Vec<(String, u32)>, String> {
    struct R<'a> {
        b: &'a [u8],
        pos: usize,
        v1: bool,
    }
    impl R<'_> {
        fn take(&mut self, n: u64, what: &str) -> Result<&[u8], String> {
            let end = (self.pos as u64)
                .checked_add(n)
                .filter(|&e| e <= self.b.len() as u64);
            match end {
                Some(end) => {
                    let s = &self.b[self.pos..end as usize];
                    self.pos = end as usize;
                    Ok(s)
                }
                None => Err(format!(
                    "header ends early: {what} at byte {} needs {n} bytes",
                    self.pos
                )),
            }
        }
        fn u32(&mut self, what: &str) -> Result<u32, String> {
            Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
        }
        fn u64(&mut self, what: &str) -> Result<u64, String> {
            Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
        }
        fn len(&mut self, what: &str) -> Result<u64, String> {
            if self.v1 {
                self.u32(what).map(u64::from)
            } else {
                self.u64(what)
            }
        }
        fn string(&mut self, what: &str) -> Result<String, String> {
            let n = self.len(what)?;
            Ok(String::from_utf8_lossy(self.take(n, what)?).into_owned())
        }
        fn skip_value(&mut self, ty: u32, depth: usize) -> Result<(), String> {
            let size = match ty {
                0 | 1 | 7 => 1,
                2 | 3 => 2,
                4..=6 => 4,
                10..=12 => 8,
                8 => return self.string("string value").map(drop),
                9 => {
                    if depth > 8 {
                        return Err("metadata arrays nested too deep".into());
                    }
                    let elem = self.u32("array type")?;
                    let n = self.len("array length")?;
                    if n > self.b.len() as u64 {
                        return Err(format!("array of {n} elements is longer than the file"));
                    }
                    for _ in 0..n {
                        self.skip_value(elem, depth + 1)?;
                    }
                    return Ok(());
                }
                _ => return Err(format!("unknown metadata value type {ty}")),
            };
            self.take(size, "metadata value").map(drop)
        }
    }
    let mut r = R {
        b,
        pos: 4,
        v1: false,
    };
    let version = r.u32("version")?;
    r.v1 = version == 1;
    let n_tensors = r.len("tensor count")?;
    let n_kv = r.len("metadata count")?;
    for _ in 0..n_kv {
        r.string("metadata key")?;
        let ty = r.u32("metadata type")?;
        r.skip_value(ty, 0)?;
    }
    let mut out = Vec::new();
    for _ in 0..n_tensors {
        let name = r.string("tensor name")?;
        let nd = r.u32("tensor rank")?;
        if nd > 4 {
            return Err(format!("tensor {name:?} has {nd} dimensions"));
        }
        for _ in 0..nd {
            r.len("tensor dimension")?;
        }
        let ty = r.u32("tensor type")?;
        r.u64("tensor offset")?;
        out.push((name, ty));
    }
    Ok(out)
}

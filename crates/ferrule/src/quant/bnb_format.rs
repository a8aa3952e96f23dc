//! The bitsandbytes serialized layout, as transformers saves a `load_in_4bit` / `load_in_8bit`
//! model (`QuantState.as_dict(packed=True)`, `Linear8bitLt._save_to_state_dict`):
//!
//! * 4-bit, per weight `W` (`model.layers.0.self_attn.q_proj.weight`): `W` (uint8
//!   `[ceil(n/2), 1]`), `W.absmax` (f32, or uint8 with double quantization), `W.quant_map`
//!   (f32 `[16]`), with double quantization `W.nested_absmax` and `W.nested_quant_map`, and
//!   `W.quant_state.bitsandbytes__nf4` (uint8 bytes of a JSON object: quant_type, blocksize,
//!   dtype, shape, nested_blocksize, nested_dtype, nested_offset);
//! * int8, per module `M`: `M.weight` (int8 `[out, in]`), `M.SCB` (f32 `[out]`) and
//!   `M.weight_format` (uint8 scalar, 0 = row-major).

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::Dtype;
use serde_json::{json, Value};

use super::blockwise4::{Absmax, NESTED_BLOCKSIZE};
use super::{Bf16Rows, Blockwise4, Code4, Int8Rows, QuantMatrix, QuantMethod, QuantSpec};
use crate::util::atomic::{HeaderEntry, RawTensor};
use crate::util::mapped::{Bytes, MappedBytes};

const QUANT_STATE: &str = ".quant_state.bitsandbytes__";

/// Whether a checkpoint tensor is part of a bitsandbytes-quantized weight (other than the
/// packed weight itself).
pub fn is_component(name: &str) -> bool {
    name.contains(QUANT_STATE)
        || [
            ".absmax",
            ".quant_map",
            ".nested_absmax",
            ".nested_quant_map",
            ".SCB",
            ".weight_format",
        ]
        .iter()
        .any(|s| name.ends_with(s))
}

/// Whether a tensor of this dtype can be the packed data of a quantized weight.
pub fn is_packed_dtype(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::U8 | Dtype::I8)
}

fn take(
    raw: &mut HashMap<String, RawTensor>,
    file: &Path,
    key: &str,
    dtype: Dtype,
) -> Result<RawTensor> {
    let t = raw
        .remove(key)
        .ok_or_else(|| anyhow!("{}: bitsandbytes tensor {key:?} is missing", file.display()))?;
    if t.dtype != dtype {
        bail!(
            "{}: {key:?} has dtype {:?}, expected {dtype:?}",
            file.display(),
            t.dtype
        )
    }
    Ok(t)
}

fn f32s(t: &RawTensor) -> Vec<f32> {
    t.data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Builds the quantized weights described by bitsandbytes tensors in `raw` (removing them);
/// returns them by weight name. Anything left over or inconsistent is an error naming the
/// file and key.
pub fn assemble(
    raw: &mut HashMap<String, RawTensor>,
    file: &Path,
) -> Result<HashMap<String, Arc<dyn QuantMatrix>>> {
    assemble_mapped(raw, &mut HashMap::new(), file)
}

/// [`assemble`] where the packed 4-bit codes of the weights in `mapped` are read in place from
/// the checkpoint's mapping (`--stream-base`); their entries in `raw` carry no bytes.
pub fn assemble_mapped(
    raw: &mut HashMap<String, RawTensor>,
    mapped: &mut HashMap<String, MappedBytes>,
    file: &Path,
) -> Result<HashMap<String, Arc<dyn QuantMatrix>>> {
    let mut out: HashMap<String, Arc<dyn QuantMatrix>> = HashMap::new();
    let states: Vec<String> = raw
        .keys()
        .filter(|k| k.contains(QUANT_STATE))
        .cloned()
        .collect();
    for key in states {
        let (w, qt) = key.split_once(QUANT_STATE).unwrap();
        let ctx = || format!("{}: {key:?}", file.display());
        let code = Code4::parse(qt).ok_or_else(|| {
            anyhow!(
                "{}: unsupported 4-bit quant type {qt:?} (expected nf4 or fp4)",
                ctx()
            )
        })?;
        let state = take(raw, file, &key, Dtype::U8)?;
        let state: Value = serde_json::from_slice(&state.data)
            .with_context(|| format!("{}: not a JSON quant state", ctx()))?;
        let blocksize = state["blocksize"]
            .as_u64()
            .ok_or_else(|| anyhow!("{}: no integer \"blocksize\"", ctx()))?
            as usize;
        let shape: Vec<usize> = state["shape"]
            .as_array()
            .and_then(|a| a.iter().map(|v| v.as_u64().map(|x| x as usize)).collect())
            .ok_or_else(|| anyhow!("{}: no integer list \"shape\"", ctx()))?;
        if shape.len() != 2 {
            bail!(
                "{}: shape {shape:?}; only 2-D (linear) weights are supported",
                ctx()
            )
        }
        let packed: Bytes = match (take(raw, file, w, Dtype::U8)?, mapped.remove(w)) {
            (_, Some(m)) => Bytes::Mapped(m),
            (t, None) => t.data.into(),
        };
        let quant_map = f32s(&take(raw, file, &format!("{w}.quant_map"), Dtype::F32)?);
        if quant_map != code.table() {
            bail!("{}: {w}.quant_map is not bitsandbytes' {} code table; custom code tables are not supported", file.display(), code.name())
        }
        let nested = raw.contains_key(&format!("{w}.nested_absmax"));
        let absmax = if nested {
            if state["nested_blocksize"].as_u64() != Some(NESTED_BLOCKSIZE as u64) {
                bail!(
                    "{}: nested_blocksize {}, expected {NESTED_BLOCKSIZE}",
                    ctx(),
                    state["nested_blocksize"]
                )
            }
            let offset = state["nested_offset"]
                .as_f64()
                .ok_or_else(|| anyhow!("{}: no number \"nested_offset\"", ctx()))?
                as f32;
            let q = take(raw, file, &format!("{w}.absmax"), Dtype::U8)?.data;
            let nested_absmax = f32s(&take(raw, file, &format!("{w}.nested_absmax"), Dtype::F32)?);
            let code8 = f32s(&take(
                raw,
                file,
                &format!("{w}.nested_quant_map"),
                Dtype::F32,
            )?);
            let nested_code: [f32; 256] = code8.try_into().map_err(|v: Vec<f32>| {
                anyhow!(
                    "{}: {w}.nested_quant_map has {} values, expected 256",
                    file.display(),
                    v.len()
                )
            })?;
            Absmax::Double {
                q,
                nested_absmax,
                nested_code: Arc::new(nested_code),
                offset,
            }
        } else {
            Absmax::Plain(f32s(&take(raw, file, &format!("{w}.absmax"), Dtype::F32)?))
        };
        let q =
            Blockwise4::from_parts(code, shape, blocksize, packed, absmax).with_context(|| {
                format!(
                    "{}: {w:?}: the quantization statistics do not fit the shape",
                    file.display()
                )
            })?;
        out.insert(w.to_string(), Arc::new(q));
    }
    let scbs: Vec<String> = raw
        .keys()
        .filter(|k| k.ends_with(".SCB"))
        .cloned()
        .collect();
    for key in scbs {
        let module = key.strip_suffix(".SCB").unwrap();
        let w = format!("{module}.weight");
        let cb = take(raw, file, &w, Dtype::I8)?;
        let scb = f32s(&take(raw, file, &key, Dtype::F32)?);
        if let Some(fmt) = raw.remove(&format!("{module}.weight_format")) {
            if fmt.data.first().copied().unwrap_or(0) != 0 {
                bail!("{}: {module}.weight_format is {}; only row-major int8 weights (0) are supported", file.display(), fmt.data[0])
            }
        }
        let [rows, cols] = cb.shape[..] else {
            bail!(
                "{}: {w:?} has shape {:?}, expected [out, in]",
                file.display(),
                cb.shape
            )
        };
        let cb: Vec<i8> = cb.data.iter().map(|&b| b as i8).collect();
        let q = Int8Rows::from_parts(rows, cols, cb, scb)
            .with_context(|| format!("{}: {w:?}", file.display()))?;
        out.insert(w, Arc::new(q));
    }
    if let Some(k) = raw.keys().min() {
        bail!("{}: {k:?} is a bitsandbytes-style tensor ({:?}) that belongs to no complete quantized weight", file.display(), raw[k].dtype)
    }
    Ok(out)
}

/// The tensors bitsandbytes writes for the quantized weight `name` (`...q_proj.weight`): its
/// codes under `name` (not for bf16, which is written widened to f32 under `name`), and
/// [`Statistics::insert`]'s.
pub fn serialize(
    name: &str,
    q: &dyn QuantMatrix,
    out: &mut BTreeMap<String, RawTensor>,
) -> Result<()> {
    let any: &dyn Any = q.as_any();
    let codes = if let Some(b) = any.downcast_ref::<Blockwise4>() {
        RawTensor::new(Dtype::U8, vec![b.packed.len(), 1], b.packed.to_vec())
    } else if let Some(q) = any.downcast_ref::<Int8Rows>() {
        RawTensor::new(
            Dtype::I8,
            vec![q.rows, q.cols],
            q.cb.iter().map(|&v| v as u8).collect(),
        )
    } else if let Some(h) = any.downcast_ref::<Bf16Rows>() {
        // Written widened to f32 (exactly; reading it back finds the values bf16-exact and
        // holds them in bf16 again). transformers 5.24 + bitsandbytes 0.50 keep an unquantized
        // table in the checkpoint's dtype even when loading with dtype=torch.float32: a bf16
        // head then fails against f32 activations ("expected m1 and m2 to have the same
        // dtype"; SmolLM2 ties its head to the embedding), and a bf16 embedding rounds the
        // first layer's normalized input to bf16 (measured with check_model_folder.py).
        RawTensor::f32s(vec![h.rows, h.cols], &h.dequantize())
    } else {
        bail!("{name}: {} weights have no bitsandbytes layout; only nf4/fp4/int8 (and bf16) can be saved in it", q.format())
    };
    out.insert(name.to_string(), codes);
    Statistics::of(q)?.insert(name, out);
    Ok(())
}

/// The format a weight is written in, in the bitsandbytes layout.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target {
    /// NF4/FP4 (blocksize, double quantization) or int8.
    Quantized(QuantSpec),
    /// An embedding or head kept in bf16, written widened to f32 ([`serialize`]).
    Bf16,
}

impl Target {
    /// The format of `q` (same code, blocksize, double quantization), if the layout holds it.
    pub fn of(q: &dyn QuantMatrix) -> Option<Self> {
        let spec = |method, blocksize, double_quant| {
            Self::Quantized(QuantSpec {
                method,
                blocksize,
                double_quant,
            })
        };
        if let Some(b) = q.as_any().downcast_ref::<Blockwise4>() {
            let method = match b.code {
                Code4::Nf4 => QuantMethod::Nf4,
                Code4::Fp4 => QuantMethod::Fp4,
            };
            Some(spec(method, b.blocksize, b.double_quant()))
        } else if q.as_any().is::<Int8Rows>() {
            Some(spec(QuantMethod::Int8, 64, false))
        } else {
            q.as_any().is::<Bf16Rows>().then_some(Self::Bf16)
        }
    }

    /// `values` (`[rows, cols]`) in this format.
    pub fn quantize(
        self,
        name: &str,
        values: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<Arc<dyn QuantMatrix>> {
        match self {
            Self::Quantized(spec) => spec.quantize(name, values, rows, cols),
            Self::Bf16 => {
                super::check_finite(name, values)?;
                Ok(Arc::new(Bf16Rows::from_f32(values, rows, cols)))
            }
        }
    }

    /// Whether the header needs the values: the double-quantization offset is printed in the
    /// quant state's JSON, whose length therefore depends on the data.
    pub fn needs_offset(self) -> bool {
        matches!(self, Self::Quantized(s) if s.method != QuantMethod::Int8 && s.double_quant)
    }
}

/// What [`serialize`] writes of a weight besides its codes: a 4-bit weight's absmax (plain, or
/// double-quantized with its nested absmax and offset), code tables and quant state; an int8
/// weight's `SCB` and `weight_format`. [`Statistics::compute`] makes them from the values
/// without quantizing them, for a writer that streams: in the file they come before the codes
/// (the header orders the data by dtype, f32 first, then by name).
#[derive(Clone, Debug)]
pub enum Statistics {
    Blockwise4 {
        code: Code4,
        blocksize: usize,
        shape: Vec<usize>,
        absmax: Absmax,
    },
    Int8 {
        scb: Vec<f32>,
    },
    /// None: a bf16 table is only its values.
    Bf16,
}

impl Statistics {
    /// The statistics of `q`.
    pub fn of(q: &dyn QuantMatrix) -> Result<Self> {
        let any = q.as_any();
        if let Some(b) = any.downcast_ref::<Blockwise4>() {
            Ok(Self::Blockwise4 {
                code: b.code,
                blocksize: b.blocksize,
                shape: b.shape.clone(),
                absmax: b.absmax.clone(),
            })
        } else if let Some(q) = any.downcast_ref::<Int8Rows>() {
            Ok(Self::Int8 { scb: q.scb.clone() })
        } else if any.is::<Bf16Rows>() {
            Ok(Self::Bf16)
        } else {
            bail!("{} weights have no bitsandbytes layout", q.format())
        }
    }

    /// The statistics `target.quantize(values)` would have, from one pass over `values`
    /// (`[rows, cols]`) for their block or row maxima.
    pub fn compute(target: Target, values: &[f32], rows: usize, cols: usize) -> Result<Self> {
        let Target::Quantized(spec) = target else {
            return Ok(Self::Bf16);
        };
        let code = match spec.method {
            QuantMethod::Nf4 => Code4::Nf4,
            QuantMethod::Fp4 => Code4::Fp4,
            QuantMethod::Int8 => {
                let scb = Int8Rows::row_absmax(&super::policy::int8_input(values), rows, cols);
                return Ok(Self::Int8 { scb });
            }
        };
        Ok(Self::Blockwise4 {
            code,
            blocksize: spec.blocksize,
            shape: vec![rows, cols],
            absmax: Blockwise4::statistics(values, spec.blocksize, spec.double_quant)?,
        })
    }

    /// The double-quantization offset (the mean absmax), if any.
    pub fn offset(&self) -> Option<f32> {
        match self {
            Self::Blockwise4 {
                absmax: Absmax::Double { offset, .. },
                ..
            } => Some(*offset),
            _ => None,
        }
    }

    /// Inserts the tensors of the weight `name` other than its codes.
    pub fn insert(&self, name: &str, out: &mut BTreeMap<String, RawTensor>) {
        match self {
            Self::Blockwise4 {
                code,
                blocksize,
                shape,
                absmax,
            } => {
                out.insert(
                    format!("{name}.quant_map"),
                    RawTensor::f32s(vec![16], &code.table()),
                );
                let offset = match absmax {
                    Absmax::Plain(v) => {
                        out.insert(format!("{name}.absmax"), RawTensor::f32s(vec![v.len()], v));
                        None
                    }
                    Absmax::Double {
                        q,
                        nested_absmax,
                        nested_code,
                        offset,
                    } => {
                        out.insert(
                            format!("{name}.absmax"),
                            RawTensor::new(Dtype::U8, vec![q.len()], q.clone()),
                        );
                        out.insert(
                            format!("{name}.nested_absmax"),
                            RawTensor::f32s(vec![nested_absmax.len()], nested_absmax),
                        );
                        out.insert(
                            format!("{name}.nested_quant_map"),
                            RawTensor::f32s(vec![256], &nested_code[..]),
                        );
                        Some(*offset)
                    }
                };
                let state = quant_state(*code, *blocksize, shape, offset);
                out.insert(
                    format!("{name}{QUANT_STATE}{}", code.name()),
                    RawTensor::new(Dtype::U8, vec![state.len()], state.into_bytes()),
                );
            }
            Self::Int8 { scb } => {
                let module = name.strip_suffix(".weight").unwrap_or(name);
                out.insert(
                    format!("{module}.SCB"),
                    RawTensor::f32s(vec![scb.len()], scb),
                );
                out.insert(
                    format!("{module}.weight_format"),
                    RawTensor::new(Dtype::U8, vec![], vec![0]),
                );
            }
            Self::Bf16 => {}
        }
    }
}

/// bitsandbytes' `quant_state` JSON (`QuantState.as_dict(packed=True)`), written by hand to
/// keep its key order and Python's `json.dumps` spacing; `nested_offset` with double
/// quantization.
fn quant_state(
    code: Code4,
    blocksize: usize,
    shape: &[usize],
    nested_offset: Option<f32>,
) -> String {
    let shape = shape
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let mut state = format!("{{\"quant_type\": \"{}\", \"blocksize\": {blocksize}, \"dtype\": \"float32\", \"shape\": [{shape}]", code.name());
    if let Some(offset) = nested_offset {
        state += &format!(", \"nested_blocksize\": {NESTED_BLOCKSIZE}, \"nested_dtype\": \"float32\", \"nested_offset\": {}", json!(offset as f64));
    }
    state + "}"
}

/// The header entries (names, dtypes, shapes, byte counts) of what [`serialize`] writes for a
/// `[rows, cols]` weight `name` in `target`, from the shape alone, except the double
/// quantization's `nested_offset` (printed in the quant state, so its length is the data's):
/// `offset` gives it ([`Statistics::offset`]); missing when needed, it is an error.
pub fn entries(
    name: &str,
    target: Target,
    rows: usize,
    cols: usize,
    offset: Option<f32>,
) -> Result<Vec<HeaderEntry>> {
    let e = |key: String, dtype, shape| HeaderEntry::new(&key, dtype, shape);
    let spec = match target {
        Target::Bf16 => return Ok(vec![e(name.into(), Dtype::F32, vec![rows, cols])]),
        Target::Quantized(spec) => spec,
    };
    let code = match spec.method {
        QuantMethod::Nf4 => Code4::Nf4,
        QuantMethod::Fp4 => Code4::Fp4,
        QuantMethod::Int8 => {
            let module = name.strip_suffix(".weight").unwrap_or(name);
            return Ok(vec![
                e(name.into(), Dtype::I8, vec![rows, cols]),
                e(format!("{module}.SCB"), Dtype::F32, vec![rows]),
                e(format!("{module}.weight_format"), Dtype::U8, vec![]),
            ]);
        }
    };
    let n = rows * cols;
    let blocks = n.div_ceil(spec.blocksize);
    let mut out = vec![
        e(name.into(), Dtype::U8, vec![n.div_ceil(2), 1]),
        e(format!("{name}.quant_map"), Dtype::F32, vec![16]),
    ];
    let offset = match (spec.double_quant, offset) {
        (false, _) => {
            out.push(e(format!("{name}.absmax"), Dtype::F32, vec![blocks]));
            None
        }
        (true, None) => {
            bail!("internal: {name}: the header of a double-quantized weight needs its offset")
        }
        (true, Some(offset)) => {
            out.push(e(format!("{name}.absmax"), Dtype::U8, vec![blocks]));
            let nested = blocks.div_ceil(NESTED_BLOCKSIZE);
            out.push(e(format!("{name}.nested_absmax"), Dtype::F32, vec![nested]));
            out.push(e(format!("{name}.nested_quant_map"), Dtype::F32, vec![256]));
            Some(offset)
        }
    };
    let state = quant_state(code, spec.blocksize, &[rows, cols], offset);
    out.push(e(
        format!("{name}{QUANT_STATE}{}", code.name()),
        Dtype::U8,
        vec![state.len()],
    ));
    Ok(out)
}

/// Whether `q` is a format the bitsandbytes layout can hold (nf4/fp4/int8).
pub fn has_layout(q: &dyn QuantMatrix) -> bool {
    q.as_any().is::<Blockwise4>() || q.as_any().is::<Int8Rows>() || q.as_any().is::<Bf16Rows>()
}

/// The `quantization_config` transformers writes into config.json for this spec.
pub fn quantization_config(spec: &QuantSpec) -> Value {
    let four = spec.method != QuantMethod::Int8;
    json!({
        "_load_in_4bit": four,
        "_load_in_8bit": !four,
        "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": if spec.method == QuantMethod::Nf4 { "nf4" } else { "fp4" },
        "bnb_4bit_use_double_quant": spec.double_quant,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": four,
        "load_in_8bit": !four,
        "quant_method": "bitsandbytes"
    })
}

/// The quantization a config.json declares (`quantization_config` of bitsandbytes), if any.
pub fn spec_from_config(config: &Value) -> Result<Option<QuantSpec>> {
    let Some(q) = config.get("quantization_config") else {
        return Ok(None);
    };
    let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("");
    if method != "bitsandbytes" {
        bail!("quantization_config.quant_method {method:?} is not supported (only bitsandbytes nf4/fp4/int8 and GGUF files)")
    }
    let flag = |k: &str| q.get(k).and_then(Value::as_bool).unwrap_or(false);
    let m = if flag("load_in_8bit") {
        QuantMethod::Int8
    } else if flag("load_in_4bit") {
        q.get("bnb_4bit_quant_type")
            .and_then(Value::as_str)
            .unwrap_or("fp4")
            .parse()?
    } else {
        bail!("quantization_config has neither load_in_4bit nor load_in_8bit")
    };
    let dq = m != QuantMethod::Int8 && flag("bnb_4bit_use_double_quant");
    // The blocksize is per tensor (quant_state); 64 is what transformers uses.
    Ok(Some(QuantSpec {
        method: m,
        blocksize: 64,
        double_quant: dq,
    }))
}

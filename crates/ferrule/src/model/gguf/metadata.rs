//! Typed reads of GGUF metadata keys, and the model dimensions they describe.

#[allow(unused_imports)]
use super::*;

// ---------------------------------------------------------------------------------------------
// Metadata access
// ---------------------------------------------------------------------------------------------

pub(super) type Meta = HashMap<String, gguf_file::Value>;

pub(super) fn missing(path: &Path, key: &str) -> GgufError {
    GgufError::MissingKey {
        path: path.to_path_buf(),
        key: key.to_string(),
    }
}

pub(super) fn bad(path: &Path, key: &str, detail: impl Into<String>) -> GgufError {
    GgufError::BadMetadata {
        path: path.to_path_buf(),
        key: key.to_string(),
        detail: detail.into(),
    }
}

pub(super) fn meta_str<'a>(path: &Path, md: &'a Meta, key: &str) -> Result<&'a str, GgufError> {
    match md.get(key) {
        Some(gguf_file::Value::String(s)) => Ok(s),
        Some(v) => Err(bad(
            path,
            key,
            format!("expected a string, got {:?}", v.value_type()),
        )),
        None => Err(missing(path, key)),
    }
}

pub(super) fn opt_usize(path: &Path, md: &Meta, key: &str) -> Result<Option<usize>, GgufError> {
    use gguf_file::Value as V;
    let v: i128 = match md.get(key) {
        None => return Ok(None),
        Some(V::U8(x)) => (*x).into(),
        Some(V::I8(x)) => (*x).into(),
        Some(V::U16(x)) => (*x).into(),
        Some(V::I16(x)) => (*x).into(),
        Some(V::U32(x)) => (*x).into(),
        Some(V::I32(x)) => (*x).into(),
        Some(V::U64(x)) => (*x).into(),
        Some(V::I64(x)) => (*x).into(),
        Some(v) => {
            return Err(bad(
                path,
                key,
                format!("expected an integer, got {:?}", v.value_type()),
            ))
        }
    };
    usize::try_from(v)
        .map(Some)
        .map_err(|_| bad(path, key, format!("{v} is out of range")))
}

pub(super) fn meta_usize(path: &Path, md: &Meta, key: &str) -> Result<usize, GgufError> {
    opt_usize(path, md, key)?.ok_or_else(|| missing(path, key))
}

pub(super) fn opt_f64(path: &Path, md: &Meta, key: &str) -> Result<Option<f64>, GgufError> {
    use gguf_file::Value as V;
    Ok(Some(match md.get(key) {
        None => return Ok(None),
        // An f32 like 1e-5 is stored as 9.99999974e-6: keep the decimal it was written from.
        Some(V::F32(x)) => format!("{x}").parse::<f64>().unwrap_or(*x as f64),
        Some(V::F64(x)) => *x,
        Some(v) => match opt_usize(path, md, key) {
            Ok(Some(n)) => n as f64,
            _ => {
                return Err(bad(
                    path,
                    key,
                    format!("expected a number, got {:?}", v.value_type()),
                ))
            }
        },
    }))
}

/// A finite number > 0 (epsilons, rope bases and factors), the error naming the GGUF key.
pub(super) fn opt_positive(path: &Path, md: &Meta, key: &str) -> Result<Option<f64>, GgufError> {
    match opt_f64(path, md, key)? {
        Some(x) if !(x.is_finite() && x > 0.0) => Err(bad(
            path,
            key,
            format!("{x} is not a finite number greater than 0"),
        )),
        x => Ok(x),
    }
}

pub(super) fn meta_positive(path: &Path, md: &Meta, key: &str) -> Result<f64, GgufError> {
    opt_positive(path, md, key)?.ok_or_else(|| missing(path, key))
}

/// An integer ≥ 1 (layer, head and size counts), the error naming the GGUF key.
pub(super) fn meta_count(path: &Path, md: &Meta, key: &str) -> Result<usize, GgufError> {
    match meta_usize(path, md, key)? {
        0 => Err(bad(path, key, "0, expected an integer of at least 1")),
        n => Ok(n),
    }
}

pub(super) fn read_dims(path: &Path, md: &Meta, arch: Arch) -> Result<Dims, GgufError> {
    let a = arch.name();
    let key = |k: &str| format!("{a}.{k}");
    let layers = meta_count(path, md, &key("block_count"))?;
    let hidden = meta_count(path, md, &key("embedding_length"))?;
    let intermediate = meta_count(path, md, &key("feed_forward_length"))?;
    let heads = meta_count(path, md, &key("attention.head_count"))?;
    let kv_heads = opt_usize(path, md, &key("attention.head_count_kv"))?.unwrap_or(heads);
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(bad(
            path,
            &key("attention.head_count_kv"),
            format!("{kv_heads} kv heads do not divide {heads} heads"),
        ));
    }
    // transformers reads head_dim from `rope.dimension_count` for llama/mistral (not qwen2).
    let mut explicit_head_dim = opt_usize(path, md, &key("attention.key_length"))?;
    if explicit_head_dim.is_none() && arch != Arch::Qwen2 {
        explicit_head_dim = opt_usize(path, md, &key("rope.dimension_count"))?;
    }
    let head_dim = match explicit_head_dim {
        Some(hd) => hd,
        None if hidden % heads == 0 => hidden / heads,
        None => {
            return Err(bad(
                path,
                &key("attention.head_count"),
                format!("{heads} heads do not divide hidden size {hidden}"),
            ))
        }
    };
    Ok(Dims {
        layers,
        hidden,
        intermediate,
        heads,
        kv_heads,
        head_dim,
        explicit_head_dim,
    })
}

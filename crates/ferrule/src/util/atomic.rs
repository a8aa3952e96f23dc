//! Crash-safe file writes and safetensors (de)serialization.
//!
//! Every artifact ferrule persists (adapters, optimizer state, checkpoints,
//! logs rewritten on resume) goes through [`write_atomic`]: the bytes are
//! written to a temporary file in the *same directory* as the destination,
//! the file is `fsync`ed, renamed over the destination (an atomic operation
//! on POSIX file systems when source and destination share a directory), and
//! finally the directory itself is `fsync`ed so the rename survives a power
//! loss. A reader therefore observes either the complete old file or the
//! complete new file, never a torn mixture, and a failed write leaves the old
//! file untouched and removes the temporary file.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, SafeTensors, View};

/// Atomically replaces `path` with the bytes produced by `write`.
///
/// The closure receives a freshly created temporary file located in the
/// directory of `path` (so that the final `rename` never crosses a file
/// system). After the closure returns successfully the file is flushed and
/// `fsync`ed, renamed over `path`, and the parent directory is `fsync`ed.
///
/// If the closure or any later step fails, the temporary file is removed and
/// the previous content of `path` (if any) is left untouched.
///
/// A new file gets the permissions `File::create` would give it (`0o666`
/// minus the process umask on Unix); an existing file keeps its permissions.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let file_name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "cannot write atomically to {}: no file name",
                path.display()
            ),
        )
    })?;
    let dir = parent_dir(path);

    let mut builder = tempfile::Builder::new();
    let prefix = format!(".{}.", file_name.to_string_lossy());
    builder.prefix(&prefix).suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // Passed to open(2), so the umask still applies, like File::create.
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    // `NamedTempFile` deletes the file on drop, which covers every early
    // return below: only a successful `persist` keeps it.
    let mut tmp = builder.tempfile_in(dir)?;
    write(tmp.as_file_mut())?;
    tmp.as_file_mut().flush()?;
    if let Ok(meta) = std::fs::metadata(path) {
        tmp.as_file().set_permissions(meta.permissions())?;
    }
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    sync_dir(dir)
}

/// Atomically replaces `path` with `bytes`. See [`write_atomic`].
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic(path, |f| f.write_all(bytes))
}

/// `fsync`s a directory so that entries created, renamed or removed in it are
/// durable. A no-op on platforms where directories cannot be opened as files.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Creates the folder `out`, which must not exist, as a whole or not at all: `fill` writes its
/// files into `OUT.tmp` beside it (a stale one from a killed run is removed first), and the
/// folder is renamed into place once `fill` succeeds. On an error the temporary folder is
/// removed and the error returned; `out` never appears half-written.
pub fn write_folder_atomic<T>(out: &Path, fill: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    if out.exists() {
        bail!(
            "{}: already exists; choose a new output folder",
            out.display()
        )
    }
    // Appended, not `with_extension`, which would turn `model.v2` into `model.tmp`.
    let mut name = out
        .file_name()
        .with_context(|| format!("{}: not a folder name", out.display()))?
        .to_os_string();
    name.push(".tmp");
    let tmp = out.with_file_name(name);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    let written = std::fs::create_dir_all(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))
        .and_then(|_| fill(&tmp))
        .and_then(|v| {
            std::fs::rename(&tmp, out)
                .with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
            Ok(v)
        });
    if written.is_err() {
        // Best effort: the error matters more than the cleanup.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written
}

/// The directory containing `path`, with `""` mapped to `"."`.
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A tensor already copied to host memory as little-endian bytes, so that
/// serialization can never fail (candle's own `View` impl unwraps the
/// device-to-host copy). Also how dtypes candle lacks (int8) are written.
#[derive(Clone, Debug)]
pub struct RawTensor {
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl RawTensor {
    pub fn new(dtype: StDtype, shape: Vec<usize>, data: Vec<u8>) -> Self {
        Self { dtype, shape, data }
    }

    pub fn f32s(shape: Vec<usize>, values: &[f32]) -> Self {
        Self::new(
            StDtype::F32,
            shape,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
    }
}

type HostView = RawTensor;

/// Writes raw tensors (and string metadata) atomically to `path`.
pub fn save_raw_safetensors_atomic(
    path: &Path,
    tensors: &BTreeMap<String, RawTensor>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let entries: Vec<HeaderEntry> = tensors
        .iter()
        .map(|(name, t)| HeaderEntry {
            name: name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            len: t.data.len(),
        })
        .collect();
    write_safetensors_streamed(path, &entries, metadata, |i, out| {
        Ok(out.write_all(&tensors[&entries[i].name].data)?)
    })
}

/// A tensor's header entry: what the safetensors header needs, without the bytes.
#[derive(Clone, Debug)]
pub struct HeaderEntry {
    pub name: String,
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    /// Bytes of the data.
    pub len: usize,
}

impl HeaderEntry {
    /// The entry of a tensor of `dtype` and `shape`.
    pub fn new(name: &str, dtype: StDtype, shape: Vec<usize>) -> Self {
        let len = shape.iter().product::<usize>() * dtype.bitsize() / 8;
        Self {
            name: name.to_string(),
            dtype,
            shape,
            len,
        }
    }
}

impl View for &HeaderEntry {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&[])
    }
    fn data_len(&self) -> usize {
        self.len
    }
}

/// Writes a safetensors file atomically ([`write_atomic`]) with one tensor's bytes in memory at
/// a time: `write(i, out)` writes `entries[i]`'s bytes to `out` as the writer reaches it, so a
/// whole model is never serialized into one buffer (and bytes already in memory, or in a
/// mapped file, are written without a copy). The header is the safetensors crate's own
/// (`serialize` over entries whose data is empty: the offsets need only the lengths), and the
/// bytes follow in the order of the header's offsets. A tensor whose byte count differs from
/// its entry's is an error, and nothing is written.
pub fn write_safetensors_streamed(
    path: &Path,
    entries: &[HeaderEntry],
    metadata: Option<HashMap<String, String>>,
    mut write: impl FnMut(usize, &mut dyn Write) -> Result<()>,
) -> Result<()> {
    let head = safetensors::serialize(entries.iter().map(|e| (e.name.as_str(), e)), metadata)
        .with_context(|| format!("serializing safetensors for {}", path.display()))?;
    let order = data_order(&head, entries)?;
    write_atomic(path, |f| {
        let mut out = io::BufWriter::with_capacity(1 << 20, f);
        out.write_all(&head)?;
        for i in order {
            let mut counted = Counted {
                inner: &mut out,
                bytes: 0,
            };
            write(i, &mut counted).map_err(|e| io::Error::other(format!("{e:#}")))?;
            if counted.bytes != entries[i].len {
                return Err(io::Error::other(format!(
                    "tensor {:?}: {} bytes, the header says {}",
                    entries[i].name, counted.bytes, entries[i].len
                )));
            }
        }
        out.flush()
    })
    .with_context(|| format!("writing safetensors file {}", path.display()))
}

/// A writer that counts what passes through it.
struct Counted<'a> {
    inner: &'a mut dyn Write,
    bytes: usize,
}

impl Write for Counted<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The indices of `entries` in the order of their data in a header made by
/// `safetensors::serialize` (`head`: the length prefix and the JSON header).
fn data_order(head: &[u8], entries: &[HeaderEntry]) -> Result<Vec<usize>> {
    let n = u64::from_le_bytes(head[..8].try_into()?) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&head[8..8 + n])?;
    let mut order = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let start = header
            .get(&e.name)
            .and_then(|v| v["data_offsets"][0].as_u64())
            .with_context(|| format!("safetensors header without {:?}", e.name))?;
        order.push((start, i));
    }
    order.sort_unstable();
    Ok(order.into_iter().map(|(_, i)| i).collect())
}

impl View for &HostView {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Element types that can be written as little-endian bytes.
trait LeBytes: candle_core::WithDType {
    const SIZE: usize;
    fn extend_le(self, out: &mut Vec<u8>);
}

macro_rules! le_bytes {
    ($($t:ty),*) => {$(
        impl LeBytes for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn extend_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
le_bytes!(u8, u32, i16, i32, i64, f32, f64, half::f16, half::bf16);

fn le_bytes_of<T: LeBytes>(t: &Tensor) -> candle_core::Result<Vec<u8>> {
    // `flatten_all` + `to_vec1` handles rank-0, strided and device tensors;
    // the result is in logical (row-major) order, i.e. contiguous.
    let values = t.flatten_all()?.to_vec1::<T>()?;
    let mut out = Vec::with_capacity(values.len() * T::SIZE);
    for v in values {
        v.extend_le(&mut out);
    }
    Ok(out)
}

/// Copies `t` to host memory as contiguous little-endian bytes, preserving
/// its dtype.
pub fn raw_tensor(name: &str, t: &Tensor) -> Result<RawTensor> {
    let data = match t.dtype() {
        DType::U8 => le_bytes_of::<u8>(t),
        DType::U32 => le_bytes_of::<u32>(t),
        DType::I16 => le_bytes_of::<i16>(t),
        DType::I32 => le_bytes_of::<i32>(t),
        DType::I64 => le_bytes_of::<i64>(t),
        DType::F16 => le_bytes_of::<half::f16>(t),
        DType::BF16 => le_bytes_of::<half::bf16>(t),
        DType::F32 => le_bytes_of::<f32>(t),
        DType::F64 => le_bytes_of::<f64>(t),
        other => bail!("tensor {name:?}: dtype {other:?} is not supported for saving"),
    }
    .with_context(|| format!("copying tensor {name:?} to host"))?;
    Ok(HostView {
        dtype: t.dtype().into(),
        shape: t.dims().to_vec(),
        data,
    })
}

/// Writes `t`'s bytes (little-endian, its dtype) to `out`: an f32 tensor straight from its
/// values, others through [`raw_tensor`].
pub fn write_tensor(name: &str, t: &Tensor, out: &mut dyn Write) -> Result<()> {
    if t.dtype() == DType::F32 && cfg!(target_endian = "little") {
        let values = t
            .flatten_all()?
            .to_vec1::<f32>()
            .with_context(|| format!("copying tensor {name:?} to host"))?;
        out.write_all(bytemuck::cast_slice(&values))?;
    } else {
        out.write_all(&raw_tensor(name, t)?.data)?;
    }
    Ok(())
}

/// Serializes named tensors (with optional string metadata, stored in the
/// safetensors `__metadata__` header) and writes them atomically to `path`.
///
/// Tensors may live on any device and be non-contiguous; they are copied to
/// host memory with their dtype preserved. Duplicate names are an error.
pub fn save_safetensors_atomic<S: AsRef<str>>(
    path: &Path,
    tensors: &[(S, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    let mut entries = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let name = name.as_ref();
        if !seen.insert(name) {
            bail!("duplicate tensor name {name:?}");
        }
        entries.push(HeaderEntry {
            name: name.to_string(),
            dtype: t.dtype().into(),
            shape: t.dims().to_vec(),
            len: t.elem_count() * t.dtype().size_in_bytes(),
        });
    }
    write_safetensors_streamed(path, &entries, metadata, |i, out| {
        let (name, t) = &tensors[i];
        write_tensor(name.as_ref(), t, out)
    })
}

/// Serializes named tensors to an in-memory safetensors buffer.
pub fn serialize_safetensors<S: AsRef<str>>(
    tensors: &[(S, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let mut views: BTreeMap<&str, HostView> = BTreeMap::new();
    for (name, t) in tensors {
        let name = name.as_ref();
        if views.insert(name, raw_tensor(name, t)?).is_some() {
            bail!("duplicate tensor name {name:?}");
        }
    }
    let data = views.iter().map(|(name, view)| (*name, view));
    Ok(safetensors::serialize(data, metadata)?)
}

/// Loads every tensor of a safetensors file onto `device`.
///
/// Missing, truncated or otherwise corrupt files produce an error naming the
/// file; this never panics on bad input.
pub fn load_safetensors(path: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    Ok(load_safetensors_with_metadata(path, device)?.0)
}

/// Like [`load_safetensors`], also returning the `__metadata__` header
/// (empty when the file has none).
pub fn load_safetensors_with_metadata(
    path: &Path,
    device: &Device,
) -> Result<(BTreeMap<String, Tensor>, HashMap<String, String>)> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("reading safetensors file {}", path.display()))?;
    deserialize_safetensors(&bytes, device)
        .with_context(|| format!("invalid or corrupt safetensors file {}", path.display()))
}

/// Parses an in-memory safetensors buffer.
pub fn deserialize_safetensors(
    bytes: &[u8],
    device: &Device,
) -> Result<(BTreeMap<String, Tensor>, HashMap<String, String>)> {
    let (_, header) = SafeTensors::read_metadata(bytes)?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(bytes)?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let dtype = DType::try_from(view.dtype())
            .with_context(|| format!("tensor {name:?} has an unsupported dtype"))?;
        let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), device)
            .with_context(|| format!("decoding tensor {name:?}"))?;
        out.insert(name, t);
    }
    Ok((out, metadata))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn write_replaces_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        write_bytes_atomic(&p, b"one").unwrap();
        write_bytes_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(dir_entries(dir.path()), vec!["a.txt"]);
    }

    #[test]
    fn failed_write_keeps_old_file_and_removes_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_bytes_atomic(&p, b"old content").unwrap();
        let err = write_atomic(&p, |f| {
            f.write_all(b"partial new con")?;
            Err(io::Error::other("simulated failure"))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "simulated failure");
        assert_eq!(std::fs::read(&p).unwrap(), b"old content");
        assert_eq!(dir_entries(dir.path()), vec!["state.json"]);
    }

    #[test]
    fn failed_first_write_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("new.bin");
        assert!(write_atomic(&p, |_| Err(io::Error::other("no"))).is_err());
        assert!(dir_entries(dir.path()).is_empty());
    }

    #[cfg(unix)]
    #[test]
    fn existing_permissions_are_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        write_bytes_atomic(&p, b"1").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_bytes_atomic(&p, b"2").unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
    }

    #[test]
    fn safetensors_round_trip_preserves_dtype_values_and_metadata() {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        let f = Tensor::new(&[[1.5f32, -2.0, 3.25], [0.0, 1e-7, -1e30]], &dev).unwrap();
        // Non-contiguous input must be written in logical order.
        let ft = f.t().unwrap();
        let i = Tensor::new(&[i64::MIN, -1, 0, i64::MAX], &dev).unwrap();
        let u = Tensor::new(&[0u8, 7, 255], &dev).unwrap();
        let b = Tensor::new(&[1.0f32, -0.5, 3.0e38], &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let scalar = Tensor::new(42i64, &dev).unwrap();
        let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        let tensors = vec![
            ("f".to_string(), f.clone()),
            ("ft".to_string(), ft.clone()),
            ("i".to_string(), i.clone()),
            ("u".to_string(), u.clone()),
            ("b".to_string(), b.clone()),
            ("s".to_string(), scalar.clone()),
        ];
        save_safetensors_atomic(&p, &tensors, Some(meta.clone())).unwrap();
        let (loaded, lmeta) = load_safetensors_with_metadata(&p, &dev).unwrap();
        assert_eq!(lmeta, meta);
        assert_eq!(loaded.len(), 6);
        for (name, orig) in &tensors {
            let l = &loaded[name];
            assert_eq!(l.dtype(), orig.dtype(), "{name}");
            assert_eq!(l.dims(), orig.dims(), "{name}");
        }
        assert_eq!(
            loaded["f"].to_vec2::<f32>().unwrap(),
            f.to_vec2::<f32>().unwrap()
        );
        assert_eq!(
            loaded["ft"].to_vec2::<f32>().unwrap(),
            ft.to_vec2::<f32>().unwrap()
        );
        assert_eq!(
            loaded["i"].to_vec1::<i64>().unwrap(),
            i.to_vec1::<i64>().unwrap()
        );
        assert_eq!(
            loaded["u"].to_vec1::<u8>().unwrap(),
            u.to_vec1::<u8>().unwrap()
        );
        assert_eq!(
            loaded["b"].to_vec1::<half::bf16>().unwrap(),
            b.to_vec1::<half::bf16>().unwrap()
        );
        assert_eq!(loaded["s"].to_scalar::<i64>().unwrap(), 42);
        assert_eq!(dir_entries(dir.path()), vec!["t.safetensors"]);
    }

    #[test]
    fn duplicate_names_are_rejected() {
        let t = Tensor::new(&[1f32], &Device::Cpu).unwrap();
        let err = serialize_safetensors(&[("a", t.clone()), ("a", t)], None).unwrap_err();
        assert!(err.to_string().contains("duplicate"), "{err}");
    }

    #[test]
    fn bad_files_give_errors_naming_the_file() {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.safetensors");
        let err = load_safetensors(&missing, &dev).unwrap_err();
        assert!(
            format!("{err:#}").contains("missing.safetensors"),
            "{err:#}"
        );

        let good = dir.path().join("good.safetensors");
        let t = Tensor::arange(0f32, 64., &dev).unwrap();
        save_safetensors_atomic(&good, &[("x", t)], None).unwrap();
        let bytes = std::fs::read(&good).unwrap();

        let truncated = dir.path().join("truncated.safetensors");
        std::fs::write(&truncated, &bytes[..bytes.len() - 10]).unwrap();
        let err = load_safetensors(&truncated, &dev).unwrap_err();
        assert!(
            format!("{err:#}").contains("truncated.safetensors"),
            "{err:#}"
        );

        let tiny = dir.path().join("tiny.safetensors");
        std::fs::write(&tiny, &bytes[..5]).unwrap();
        assert!(load_safetensors(&tiny, &dev).is_err());

        let corrupt = dir.path().join("corrupt.safetensors");
        let mut c = bytes.clone();
        for b in c.iter_mut().skip(8).take(16) {
            *b = b'#';
        }
        std::fs::write(&corrupt, &c).unwrap();
        let err = load_safetensors(&corrupt, &dev).unwrap_err();
        assert!(
            format!("{err:#}").contains("corrupt.safetensors"),
            "{err:#}"
        );

        let huge_header = dir.path().join("huge.safetensors");
        std::fs::write(&huge_header, u64::MAX.to_le_bytes()).unwrap();
        assert!(load_safetensors(&huge_header, &dev).is_err());
    }
}

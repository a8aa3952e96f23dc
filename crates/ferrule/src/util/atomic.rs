use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use candle_core::Tensor;
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
pub fn save_safetensors_atomic(path: &Path, tensors: &[(String, Tensor)], metadata: Option<HashMap<String, String>>) -> anyhow::Result<()> {
    let data: Vec<(String, Tensor)> = tensors.to_vec();
    let bytes = safetensors::serialize(data.iter().map(|(k, t)| (k.as_str(), t)), metadata)?;
    write_bytes_atomic(path, &bytes)?;
    Ok(())
}

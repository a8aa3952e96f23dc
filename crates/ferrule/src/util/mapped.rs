//! Byte ranges of a read-only file mapping, and what the kernel is told about their pages.
//!
//! A frozen base streamed from disk (`--stream-base`, [`crate::model::stream`]) reads its
//! matrices from such ranges instead of owned buffers.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use anyhow::{bail, Result};

/// `len` bytes at `offset` of a read-only file mapping, which the range keeps alive.
#[derive(Clone)]
pub struct MappedBytes {
    map: Arc<memmap2::Mmap>,
    offset: usize,
    len: usize,
}

impl MappedBytes {
    /// The bytes of `slice`, which must lie inside `map`.
    pub fn of_slice(map: &Arc<memmap2::Mmap>, slice: &[u8]) -> Result<Self> {
        let base = map.as_ptr() as usize;
        let start = slice.as_ptr() as usize;
        if start < base || start + slice.len() > base + map.len() {
            bail!("a mapped tensor's bytes lie outside its file's mapping")
        }
        Ok(Self {
            map: map.clone(),
            offset: start - base,
            len: slice.len(),
        })
    }

    /// Bytes `offset..offset + len` of `map`.
    pub fn new(map: &Arc<memmap2::Mmap>, offset: usize, len: usize) -> Result<Self> {
        match offset.checked_add(len) {
            Some(end) if end <= map.len() => Ok(Self {
                map: map.clone(),
                offset,
                len,
            }),
            _ => bail!(
                "bytes {offset}..+{len} lie outside a mapping of {} bytes",
                map.len()
            ),
        }
    }

    /// Drops the range's pages from the process (`madvise(MADV_DONTNEED)`): they stop counting
    /// in its RSS and are read again (from the page cache, else the file) when next touched.
    pub fn release(&self) {
        super::release_pages(&self.map, self.offset, self.len);
    }

    /// Brings the range's pages into the process: `MADV_POPULATE_READ` (Linux 5.14), else one
    /// read per page. Called on the read-ahead thread, so the thread that multiplies finds the
    /// pages mapped.
    pub fn populate(&self) {
        #[cfg(target_os = "linux")]
        {
            let populated =
                self.map
                    .advise_range(memmap2::Advice::PopulateRead, self.offset, self.len);
            if populated.is_ok() {
                return;
            }
        }
        let mut sum = 0u8;
        for b in self.iter().step_by(4096) {
            // A read the compiler cannot drop: faulting the page in is the point.
            sum = sum.wrapping_add(unsafe { std::ptr::read_volatile(b) });
        }
        std::hint::black_box(sum);
    }
}

impl Deref for MappedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map[self.offset..self.offset + self.len]
    }
}

impl fmt::Debug for MappedBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MappedBytes({} at {})", self.len, self.offset)
    }
}

/// Bytes held in memory, or read in place from a file mapping.
#[derive(Clone, Debug)]
pub enum Bytes {
    Owned(Vec<u8>),
    Mapped(MappedBytes),
}

impl Bytes {
    /// The mapped range, when the bytes are mapped.
    pub fn mapped(&self) -> Option<&MappedBytes> {
        match self {
            Bytes::Mapped(m) => Some(m),
            Bytes::Owned(_) => None,
        }
    }
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Owned(v) => v,
            Bytes::Mapped(m) => m,
        }
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(v: Vec<u8>) -> Self {
        Bytes::Owned(v)
    }
}

impl PartialEq<Vec<u8>> for Bytes {
    fn eq(&self, other: &Vec<u8>) -> bool {
        **self == other[..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A range reads the file's bytes, survives release (re-read on touch) and refuses bounds
    /// outside the mapping.
    #[test]
    fn a_range_reads_its_bytes_before_and_after_release() {
        let dir = std::env::temp_dir().join(format!("ferrule-mapped-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.bin");
        let data: Vec<u8> = (0..3 * 4096 + 17).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.unwrap());
        let r = MappedBytes::new(&map, 5000, 4000).unwrap();
        assert_eq!(&r[..], &data[5000..9000]);
        r.populate();
        r.release();
        assert_eq!(&r[..], &data[5000..9000], "re-read after release");
        let b = Bytes::Mapped(MappedBytes::of_slice(&map, &map[10..20]).unwrap());
        assert!(b == data[10..20].to_vec());
        assert!(MappedBytes::new(&map, data.len() - 1, 2).is_err());
        assert!(MappedBytes::of_slice(&map, &data[..4]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

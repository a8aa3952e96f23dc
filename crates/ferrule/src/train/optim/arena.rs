//! Where [`super::BnbAdamW`] keeps its state: one byte buffer, in memory or in a memory-mapped
//! file (the CPU analogue of bitsandbytes' paged optimizers and ZeRO-Infinity's NVMe-offloaded
//! state). Each parameter owns a range of it; a step touches one range at a time and, for a
//! file, hands the range's pages back to the kernel afterwards, so the resident state is
//! bounded by the largest parameter's.

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Alignment of every range (f32 arrays are read in place).
pub(super) const ALIGN: usize = 8;

/// The optimizer state's bytes.
pub(super) enum Arena {
    /// In memory (`u64` words: 8-byte aligned).
    Heap(Vec<u64>),
    /// A memory-mapped file without a name in the folder `dir` (`O_TMPFILE`, or created and
    /// unlinked at once where that is missing): it takes its space on that disk while mapped,
    /// and the kernel frees it when the process ends, a `kill -9` included, so no run leaves a
    /// state file behind.
    Mapped {
        map: memmap2::MmapMut,
        dir: PathBuf,
        file: File,
    },
}

impl Arena {
    /// `len` zeroed bytes in memory.
    pub fn heap(len: usize) -> Arena {
        Arena::Heap(vec![0u64; len.div_ceil(8)])
    }

    /// `len` zeroed bytes in a new file of folder `dir` (created when missing), mapped shared.
    /// The file is sparse until written; errors name the folder (missing permission, no space).
    pub fn mapped(dir: &Path, len: usize) -> Result<Arena> {
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "offload folder {} (--offload-dir): cannot create it",
                dir.display()
            )
        })?;
        let file = tempfile::tempfile_in(dir).with_context(|| {
            format!(
                "offload folder {} (--offload-dir): cannot create the optimizer state file there",
                dir.display()
            )
        })?;
        Ok(Arena::Mapped {
            map: Self::map_file(&file, dir, len)?,
            dir: dir.to_path_buf(),
            file,
        })
    }

    fn map_file(file: &File, dir: &Path, len: usize) -> Result<memmap2::MmapMut> {
        let ctx = || {
            format!(
                "optimizer state file in {} (--offload-dir): cannot reserve {len} bytes",
                dir.display()
            )
        };
        file.set_len(len.max(1) as u64).with_context(ctx)?;
        // Reserve the blocks now, so that a full disk fails here with a named error rather
        // than as a SIGBUS in the middle of a step.
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: a plain syscall on an open file descriptor.
            let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len.max(1) as i64) };
            if rc != 0 {
                return Err(std::io::Error::from_raw_os_error(rc)).with_context(ctx);
            }
        }
        // SAFETY: the file was created by us, is private to this process, and lives as long as
        // the map (the arena owns both).
        unsafe { memmap2::MmapMut::map_mut(file) }.with_context(ctx)
    }

    /// The folder whose disk holds the state, for a paged arena.
    pub fn dir(&self) -> Option<&Path> {
        match self {
            Arena::Heap(_) => None,
            Arena::Mapped { dir, .. } => Some(dir),
        }
    }

    /// The state file's length in bytes, for a paged arena.
    pub fn file_len(&self) -> Option<u64> {
        match self {
            Arena::Heap(_) => None,
            Arena::Mapped { file, .. } => file.metadata().ok().map(|m| m.len()),
        }
    }

    /// The bytes of `range`.
    pub fn bytes(&self, range: Range<usize>) -> &[u8] {
        match self {
            Arena::Heap(words) => &bytemuck::cast_slice(words)[range],
            Arena::Mapped { map, .. } => &map[range],
        }
    }

    /// The bytes of `range`, writable.
    pub fn bytes_mut(&mut self, range: Range<usize>) -> &mut [u8] {
        match self {
            Arena::Heap(words) => &mut bytemuck::cast_slice_mut(words)[range],
            Arena::Mapped { map, .. } => &mut map[range],
        }
    }

    /// Hands the pages of `range` back to the kernel once a step is done with them: for a file,
    /// they leave the process's resident set (written back to the file by the kernel, read from
    /// it again when next touched); in memory, nothing.
    pub fn release(&self, range: Range<usize>) {
        #[cfg(unix)]
        if let Arena::Mapped { map, .. } = self {
            // Whole pages inside the range only: a neighbour's bytes may share its edge pages.
            let page = 4096;
            let start = range.start.div_ceil(page) * page;
            let end = range.end / page * page;
            if end > start {
                // SAFETY: a shared file mapping: dropped pages keep their contents in the page
                // cache and the file. Failure only means the pages stay resident.
                let _ = unsafe {
                    map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        start,
                        end - start,
                    )
                };
            }
        }
        #[cfg(not(unix))]
        let _ = range;
    }
}

/// `bytes` as f32s (`bytes` starts 4-byte aligned and holds whole values: every range of an
/// [`Arena`] is [`ALIGN`]ed).
pub(super) fn f32s(bytes: &[u8]) -> &[f32] {
    bytemuck::cast_slice(bytes)
}

/// `bytes` as f32s, writable.
pub(super) fn f32s_mut(bytes: &mut [u8]) -> &mut [f32] {
    bytemuck::cast_slice_mut(bytes)
}

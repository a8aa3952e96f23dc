//! Small, dependency-light utilities shared by the rest of the crate.

pub mod atomic;
pub mod finite;

/// Drops the pages of `mmap[offset..offset + len]` from the process (`madvise(DONTNEED)`), once
/// what they hold has been copied out; they are read from the file again if touched.
pub fn release_pages(mmap: &memmap2::Mmap, offset: usize, len: usize) {
    #[cfg(unix)]
    {
        // SAFETY: a read-only private file mapping: dropped pages are re-read from the file.
        // Failure only means the pages stay resident.
        let _ = unsafe { mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len) };
    }
    #[cfg(not(unix))]
    let _ = (mmap, offset, len);
}

//! Small, dependency-light utilities shared by the rest of the crate.

pub mod atomic;
pub mod finite;
pub(crate) mod json_keys;
pub mod mapped;

/// Errors (instead of the allocator aborting the process) when a tensor of `shape` with
/// `elem_bytes`-byte elements cannot fit in this machine's available memory (`MemAvailable` of
/// /proc/meminfo; on other systems only an overflowing size is refused). A config asking for
/// `r = 2^40`, say, is then an error naming the tensor.
pub fn ensure_allocatable(what: &str, shape: &[usize], elem_bytes: usize) -> anyhow::Result<()> {
    let bytes = shape.iter().try_fold(elem_bytes, |n, &d| n.checked_mul(d));
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| {
                l.strip_prefix("MemAvailable:")
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
        })
        .map(|kb| kb.saturating_mul(1024));
    match (bytes, available) {
        (None, _) => anyhow::bail!("{what} would take more than 2^64 bytes"),
        (Some(b), Some(avail)) if b as u64 > avail => {
            anyhow::bail!(
                "{what} would take {:.3e} bytes, more than the {:.3e} this machine has available",
                b as f64,
                avail as f64
            )
        }
        _ => Ok(()),
    }
}

/// FNV-1a, 64 bits: a digest for ranks to compare what they loaded (not cryptographic).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A JSON value as an error message shows it: its JSON text, cut after 60 characters.
pub fn shown_value(v: &serde_json::Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(60) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s,
    }
}

/// Drops the pages of `mmap[offset..offset + len]` from the process (`madvise(DONTNEED)`), once
/// what they hold has been copied out; they are read from the file again if touched.
pub fn release_pages(mmap: &memmap2::Mmap, offset: usize, len: usize) {
    #[cfg(unix)]
    {
        // SAFETY: a read-only private file mapping: dropped pages are re-read from the file.
        // Failure only means the pages stay resident.
        let _ =
            unsafe { mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len) };
    }
    #[cfg(not(unix))]
    let _ = (mmap, offset, len);
}

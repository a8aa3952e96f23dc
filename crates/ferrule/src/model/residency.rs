//! `--max-resident-gb G`: a base streamed from disk ([`super::stream`]) that keeps as many of
//! its frozen matrices resident as fit in `G` GB, so that a model that fits runs as it does in
//! memory and one that does not still runs, streamed.
//!
//! The budget covers the frozen base's memory: what a streamed base always holds (norms,
//! biases, quantization statistics: [`Residency::held`]), the matrices kept resident
//! ([`Residency::kept`]), and the streaming window of the rest (the largest use while the next
//! is read ahead, [`Weights::stream_window_bytes`]'s estimate: [`Residency::window`]). With
//! nothing kept it is `--stream-base`'s base; a budget below that is an error naming it.
//!
//! The choice is made when the checkpoint is mapped ([`crate::model::ModelSource::load_with`]),
//! so every command that loads a streamed base honours it. Matrices are kept in the order they
//! were mapped (by tensor name: `lm_head` first, then the blocks), each while the total stays
//! within the budget; one that does not fit is skipped, and smaller ones after it may still be
//! kept. An embedding beside an untied head comes last: its lookup reads a few rows. Which
//! blocks are kept matters little: a step reads every block's matrices alike (forward,
//! recomputation, backward). A kept matrix is counted at [`StreamedWeight::use_bytes`]: its
//! mapped pages, and for a dense matrix stored in another dtype than the compute dtype the
//! converted copy each use makes. Kept or streamed,
//! a matrix is read by the same code, so the run's results are the in-memory run's bit for
//! bit (tests/stream_base.rs).

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{bail, Result};
use serde::Serialize;

use super::stream::StreamedWeight;
use super::weights::{window_bytes, Weights};

/// Bytes of the frozen base under a residency budget.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Residency {
    /// Held in memory whatever is streamed: tensors that are not mapped matrices and the
    /// copied statistics of quantized ones.
    pub held: usize,
    /// The matrices kept resident, at [`StreamedWeight::use_bytes`].
    pub kept: usize,
    /// Matrices kept resident.
    pub kept_matrices: usize,
    /// Matrices streamed (paged in per use).
    pub streamed_matrices: usize,
    /// The streaming window of the matrices not kept.
    pub window: usize,
}

impl Residency {
    /// The frozen base's bytes: held, kept and the window.
    pub fn total(&self) -> usize {
        self.held + self.kept + self.window
    }
}

/// Gigabytes (10⁹ bytes, as `ferrule plan` prints them) to bytes; `flag` names the setting in
/// the error for a negative or non-finite value.
pub fn budget_bytes(gb: f64, flag: &str) -> Result<usize> {
    if !gb.is_finite() || gb < 0.0 {
        bail!("{flag} {gb}: expected a number of gigabytes, 0 or more")
    }
    Ok((gb * 1e9).round() as usize)
}

/// Which of `weights`' streamed matrices fit `budget` bytes of frozen base, and the bytes that
/// gives. Errors, naming `flag` and the minimum, when even streaming everything does not fit.
pub fn choose(
    weights: &Weights,
    budget: usize,
    flag: &str,
) -> Result<(Residency, Vec<Arc<StreamedWeight>>)> {
    let dtype = weights.compute_dtype();
    let held = weights.held_bytes();
    // By name: the order the checkpoint was mapped in.
    let mut rest: BTreeMap<&str, &Arc<StreamedWeight>> = (weights.streamed().iter())
        .map(|(n, s)| (n.as_str(), s))
        .collect();
    let window = |rest: &BTreeMap<&str, &Arc<StreamedWeight>>| {
        window_bytes(rest.iter().map(|(n, s)| (*n, s.as_ref())), dtype)
    };
    let least = held + window(&rest);
    if budget < least {
        bail!(
            "{flag} {}: the frozen base needs at least {:.3} GB ({least} bytes) when streamed ({:.3} GB held in memory: norms, biases, quantization statistics; {:.3} GB for the matrix in use and the one read ahead); give at least that, or --stream-base for the least",
            budget as f64 / 1e9,
            least as f64 / 1e9,
            held as f64 / 1e9,
            (least - held) as f64 / 1e9
        )
    }
    // An embedding beside an untied head of its shape goes last: its lookup reads a few rows,
    // so keeping it resident saves almost nothing.
    let lookup_only = |name: &str, s: &StreamedWeight| {
        name.contains("embed")
            && (weights.streamed().iter())
                .any(|(n, head)| n.starts_with("lm_head") && head.dims() == s.dims())
    };
    let mut names: Vec<&str> = rest.keys().copied().collect();
    names.sort_by_key(|n| (lookup_only(n, rest[n]), *n));
    let (mut kept, mut chosen) = (0usize, Vec::new());
    for name in names {
        let s = rest.remove(name).expect("listed above");
        let cost = s.use_bytes(dtype);
        if held + kept + cost + window(&rest) <= budget {
            kept += cost;
            chosen.push(s.clone());
        } else {
            rest.insert(name, s);
        }
    }
    let residency = Residency {
        held,
        kept,
        kept_matrices: chosen.len(),
        streamed_matrices: rest.len(),
        window: window(&rest),
    };
    Ok((residency, chosen))
}

/// Pins the matrices [`choose`] picks for `budget` (their pages stay once used) and returns
/// the residency.
pub fn keep_resident(weights: &Weights, budget: usize, flag: &str) -> Result<Residency> {
    let (residency, chosen) = choose(weights, budget, flag)?;
    for s in chosen {
        s.pin();
    }
    tracing::info!(
        "{flag}: {} matrices kept resident ({:.3} GB), {} streamed",
        residency.kept_matrices,
        residency.kept as f64 / 1e9,
        residency.streamed_matrices
    );
    Ok(residency)
}

/// The frozen base's bytes as `weights` stand: held, the pinned matrices, and the streaming
/// window of the others (all of it held for a base loaded in memory).
pub fn of(weights: &Weights) -> Residency {
    let dtype = weights.compute_dtype();
    let (kept, rest): (Vec<_>, Vec<_>) =
        (weights.streamed().iter()).partition(|(_, s)| s.is_pinned());
    Residency {
        held: weights.held_bytes(),
        kept: kept.iter().map(|(_, s)| s.use_bytes(dtype)).sum(),
        kept_matrices: kept.len(),
        streamed_matrices: rest.len(),
        window: window_bytes(rest.iter().map(|(n, s)| (n.as_str(), s.as_ref())), dtype),
    }
}

/// What a run on `weights` reports of its streamed base; `None` when it is not streamed.
pub fn report(weights: &Weights) -> Option<crate::train::StreamedBase> {
    let any = weights.streamed().values().next()?;
    Some(crate::train::StreamedBase {
        residency: of(weights),
        peak_mapped_resident_bytes: any.streamer().peak_resident_bytes(),
    })
}

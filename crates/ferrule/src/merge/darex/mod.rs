//! DARE and DAREx-q: dropping most of a fine-tuning delta and rescaling the rest.
//!
//! DARE (Yu et al. 2024, arXiv 2311.03099) drops each delta entry with probability `p` and
//! rescales the kept ones by `1/(1−p)`; DAREx-q (Deng et al. 2025, "DARE the Extreme",
//! arXiv 2410.09344, eq. 4) rescales them by `1/q` with `q ∈ [1−p, 1)` instead, because at
//! high `p` the factor `1/(1−p)` overshoots. The deltas are each adapter's merged update
//! `ΔW_i` (LoRA: `s·B·A`), not its factors: the paper prunes delta parameters
//! (`vengdeng/DAREx utils/deltaprune.py`), and so does this module; peft's `dare_*`
//! combinations instead prune `A` and `B` separately (`merge::adapters`).
//!
//! `q` is given; or chosen for the whole merge as the reference's "output change" criterion does
//! it ([`dense`],
//! `find_q_decoder.py --outputchange`): the `q` whose merged model's logits on one batch of
//! the user's data are closest (mean squared difference) to those of the unpruned merge
//! `W + Σ w_i ΔW_i`. The search is a golden-section search over `[1−p, 1]`, DARE's `q = 1−p`
//! always among the points tried; or per layer and adapter by the reference's analytic rule
//! on `ΔW ⊙ x̄` ([`analytic`], `utils/analyticalq.py`; its `η` is the authors' default, which
//! they tune on validation data), used by peft's `dare_*_svd` combinations (`merge::adapters`).

pub mod analytic;
pub mod dense;

pub use analytic::*;
pub use dense::*;

//! BitFit's layers (Ben Zaken et al. 2022, §2): every weight stays frozen and a bias term `b`
//! trains in place, so the forward pass is the base model's. A linear layer is
//! `y = W₀x + b` (eqs. 1, 3, 4 and the q/k/v projections), run as the frozen product without
//! its bias followed by `+ b` ([`crate::tuners::bias::BiasTrainedLinear`]); a LayerNorm is
//! `y = g ⊙ (x − μ)/σ + b` (eqs. 2, 5), run by the model's differentiable norm once `b` is a
//! tracked tensor.
//!
//! Which term a module's bias is, from its Hugging Face path (BERT's, or a Llama-shaped
//! decoder's): [`linear_term`], [`norm_term`].

use super::config::BiasTerm;

/// The term of the bias of the linear layer at `path`; `None` for one no term but `all` names
/// (the pooler, heads).
pub fn linear_term(path: &str) -> Option<BiasTerm> {
    let ends = |s: &[&str]| s.iter().any(|s| path.ends_with(s));
    if ends(&["attention.self.query", "self_attn.q_proj"]) {
        Some(BiasTerm::Query)
    } else if ends(&["attention.self.key", "self_attn.k_proj"]) {
        Some(BiasTerm::Key)
    } else if ends(&["attention.self.value", "self_attn.v_proj"]) {
        Some(BiasTerm::Value)
    } else if ends(&["attention.output.dense", "self_attn.o_proj"]) {
        Some(BiasTerm::AttentionOutput)
    } else if ends(&["intermediate.dense", "mlp.gate_proj", "mlp.up_proj"]) {
        Some(BiasTerm::Intermediate)
    } else if ends(&["output.dense", "mlp.down_proj"]) {
        Some(BiasTerm::Output)
    } else {
        None
    }
}

/// The term of the bias of the norm at `path`; `None` for one only `all` names (BERT's
/// `embeddings.LayerNorm`).
pub fn norm_term(path: &str) -> Option<BiasTerm> {
    if path.ends_with("attention.output.LayerNorm") {
        Some(BiasTerm::AttentionLayerNorm)
    } else if path.ends_with("output.LayerNorm") {
        Some(BiasTerm::OutputLayerNorm)
    } else {
        None
    }
}

/// BERT's pooler (`pooler.dense`), whose bias the reference trains with every subset of terms
/// (`_deactivate_relevant_gradients` adds `pooler.dense.bias`).
pub fn is_pooler(path: &str) -> bool {
    path.ends_with("pooler.dense")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hugging_face_paths_map_to_the_papers_terms() {
        let l = "encoder.layer.0";
        assert_eq!(
            linear_term(&format!("bert.{l}.attention.output.dense")),
            Some(BiasTerm::AttentionOutput)
        );
        assert_eq!(
            linear_term(&format!("{l}.output.dense")),
            Some(BiasTerm::Output)
        );
        assert_eq!(
            linear_term("model.layers.1.mlp.up_proj"),
            Some(BiasTerm::Intermediate)
        );
        assert_eq!(
            linear_term("model.layers.1.self_attn.k_proj"),
            Some(BiasTerm::Key)
        );
        assert_eq!(linear_term("bert.pooler.dense"), None);
        assert_eq!(linear_term("classifier"), None);
        assert_eq!(
            norm_term(&format!("{l}.attention.output.LayerNorm")),
            Some(BiasTerm::AttentionLayerNorm)
        );
        assert_eq!(
            norm_term(&format!("{l}.output.LayerNorm")),
            Some(BiasTerm::OutputLayerNorm)
        );
        assert_eq!(norm_term("embeddings.LayerNorm"), None);
        assert!(is_pooler("bert.pooler.dense"));
    }
}

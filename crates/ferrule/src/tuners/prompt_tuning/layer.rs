//! Prompt tuning's virtual tokens (Lester et al. 2021, §2): `n` trained embeddings `P: [n, h]`
//! put before the input embeddings, `[P; E(x)]` (peft `tuners/prompt_tuning/model.py`,
//! `PromptEmbedding`, and `PeftModelForCausalLM.forward`).

use candle_core::{Result, Tensor, Var};

use crate::model::VirtualTokens;

/// The trained prompt `P: [num_virtual_tokens, hidden]`.
pub struct PromptEmbedding {
    pub table: Var,
}

impl VirtualTokens for PromptEmbedding {
    fn embeddings(&self) -> Result<Tensor> {
        Ok(self.table.as_tensor().clone())
    }

    fn num_tokens(&self) -> usize {
        self.table.dims()[0]
    }
}

/// PEFT's TEXT initialisation ids: the text's tokens cut to `n`, or repeated until there are
/// `n` (`PromptEmbedding.__init__`: `ids * ceil(n / len)`, then `[:n]`).
pub fn fit_to(ids: &[u32], n: usize) -> Vec<u32> {
    ids.iter()
        .copied()
        .cycle()
        .take(if ids.is_empty() { 0 } else { n })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::fit_to;

    #[test]
    fn text_ids_are_cut_or_repeated_as_peft_does() {
        assert_eq!(fit_to(&[5, 6, 7], 2), vec![5, 6]);
        assert_eq!(fit_to(&[5, 6, 7], 7), vec![5, 6, 7, 5, 6, 7, 5]);
        assert_eq!(fit_to(&[5, 6, 7], 3), vec![5, 6, 7]);
        assert!(fit_to(&[], 3).is_empty());
    }
}

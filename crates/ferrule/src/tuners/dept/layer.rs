//! DePT's inputs (Shi & Lipani 2024, "DePT: Decomposed Prompt Tuning", eq. 2): the token
//! embeddings `E: [s, d]` of a sequence become `E + (α/√r)·A B` row by row, `A: [max_length, r]`,
//! `B: [r, d]`, and prompt tuning's `m` virtual tokens `P: [m, d]` go before them. Reference:
//! ZhengxiangShi/DePT `peft/peft_model.py:827-834` (`PeftModelForCausalLM.forward`: the
//! product added to the embeddings of an input padded to `max_length`, then the prompt
//! prepended) and `peft/tuners/prompt_tuning_lora.py:128-139` (shapes, init, scaling).

use candle_core::{Result, Tensor, Var};

use crate::model::VirtualTokens;
use crate::tuners::prompt_tuning::layer::PromptEmbedding;

/// The prompt and the low-rank pair of one DePT adapter.
pub struct DeptInputs {
    /// `P: [m, d]`, prompt tuning's own.
    pub prompt: PromptEmbedding,
    /// `A: [max_length, r]`.
    pub a: Var,
    /// `B: [r, d]`.
    pub b: Var,
    /// `α/√r`.
    pub scale: f64,
}

impl VirtualTokens for DeptInputs {
    fn embeddings(&self) -> Result<Tensor> {
        self.prompt.embeddings()
    }

    fn num_tokens(&self) -> usize {
        self.prompt.num_tokens()
    }

    /// Rows `positions` of `(α/√r)·A B`, computed as `(α/√r)·A[positions] B` (the same rows,
    /// without the product's unused ones). A position at or past `max_length` (A's rows) is an
    /// error: the reference adds the whole `[max_length, d]` product to an input padded to
    /// exactly `max_length`, so it has no row for it.
    fn input_delta(&self, positions: &[u32]) -> Result<Option<Tensor>> {
        let rows = self.a.dims()[0];
        if let Some(&last) = positions.iter().max().filter(|&&p| p as usize >= rows) {
            candle_core::bail!(
                "dept: a sequence of {} tokens is longer than max_length = {rows} (the rows of prompt_encoder.lora_embedding_A; DePT's reference pads every input to exactly max_length): shorten the inputs (--max-len {rows}) or train with a larger max_length (--dept-max-length)",
                last + 1
            )
        }
        let index = Tensor::from_slice(positions, positions.len(), self.a.device())?;
        let a = self.a.as_tensor().index_select(&index, 0)?;
        Ok(Some((a.matmul(self.b.as_tensor())? * self.scale)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// By hand: A = [[1, 2], [3, 4], [5, 6]], B = [[1, 0, 1], [0, 1, 1]], α/√r = 0.5, so the
    /// rows of 0.5·A B are [0.5, 1, 1.5], [1.5, 2, 3.5], [2.5, 3, 5.5].
    #[test]
    fn rows_of_the_scaled_product_by_position_and_the_length_error() {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &dev).unwrap())
            .unwrap();
        let b =
            Var::from_tensor(&Tensor::new(&[[1f32, 0., 1.], [0., 1., 1.]], &dev).unwrap()).unwrap();
        let prompt = PromptEmbedding {
            table: Var::zeros((1, 3), candle_core::DType::F32, &dev).unwrap(),
        };
        let inputs = DeptInputs {
            prompt,
            a,
            b,
            scale: 0.5,
        };
        let d = inputs.input_delta(&[2, 0, 1]).unwrap().unwrap();
        assert_eq!(
            d.to_vec2::<f32>().unwrap(),
            [[2.5, 3., 5.5], [0.5, 1., 1.5], [1.5, 2., 3.5]]
        );
        let e = inputs.input_delta(&[0, 1, 2, 3]).unwrap_err().to_string();
        assert!(
            e.contains("a sequence of 4 tokens is longer than max_length = 3"),
            "{e}"
        );
    }
}

//! `ferrule logits`: f32 outputs for given input tensors, for parity checks.

use ferrule::ops::ComputeDtypeChoice;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::DType;
use ferrule::model::Inputs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: super::ModelArgs,
    /// safetensors with `input_ids` and optionally `attention_mask`, `token_type_ids` and
    /// `position_ids` ([b, t]; decoders: each token's rope position as transformers takes it,
    /// e.g. `cumsum(mask) - 1` for a left-padded batch; prefix tuning shifts them past its
    /// prefix and prompt tuning ignores them, as peft does).
    #[arg(long)]
    inputs: PathBuf,
    /// safetensors written with a `logits` tensor (f32).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let dev = super::device();
    let m = a.model.load(ComputeDtypeChoice::F32)?;
    ferrule::merge::BaseRecord::warn_if_run_elsewhere(
        m.adapters.iter().map(|l| l.dir.as_path()),
        &m.source,
        a.model.quant.spec()?.as_ref(),
    )?;
    let t = ferrule::model::weights::load_safetensors_file(&a.inputs, &dev)?;
    let ids = t
        .get("input_ids")
        .with_context(|| format!("{}: no \"input_ids\" tensor", a.inputs.display()))?;
    let inputs = Inputs {
        input_ids: ids,
        attention_mask: t.get("attention_mask"),
        token_type_ids: t.get("token_type_ids"),
    };
    let position_ids = t.get("position_ids");
    let logits = m
        .model
        .forward_at(&inputs, position_ids)
        .with_context(|| format!("{}", a.inputs.display()))?;
    if ferrule::util::finite::first_non_finite(&logits)?.is_some() {
        let origin = m.model.non_finite_origin(&inputs, position_ids);
        ferrule::util::finite::ensure_finite(
            &logits,
            || {
                format!(
                    "the logits for {} (index [batch, position, output])",
                    a.inputs.display()
                )
            },
            &format!(
                "the model or adapter produced a non-finite output{origin}; {} was not written",
                a.out.display()
            ),
        )?;
    }
    ferrule::peft_io::write_safetensors(
        &a.out,
        &[("logits".to_string(), logits.to_dtype(DType::F32)?)],
        &[("format", "pt")],
    )?;
    Ok(())
}

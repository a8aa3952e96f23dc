//! `ferrule eval`

use ferrule::ops::ComputeDtypeChoice;
use std::path::PathBuf;

use anyhow::Result;
use ferrule::data::{EncodeOptions, LabelMap, Truncation};
use ferrule::model::Task;
use ferrule::train::{encode_file, evaluate};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: super::ModelArgs,
    /// JSONL records to evaluate.
    #[arg(long)]
    data: PathBuf,
    /// Records per batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Longest sequence in tokens; longer records are cut on the right (and counted).
    #[arg(long, default_value_t = 512)]
    max_len: usize,
    /// Evaluate the first N records only.
    #[arg(long)]
    limit: Option<usize>,
    /// Count loss on prompt tokens too.
    #[arg(long)]
    include_prompt: bool,
    /// Batch layout: free (padding-free, the default), longest or max-len (as `ferrule train`;
    /// the loss is the same, within float rounding).
    #[arg(long, value_parser = super::parse_padding, default_value = "free")]
    padding: ferrule::data::Padding,
    /// Evaluate a DyLoRA adapter at every rank 1..r, as the reference does (one JSON line per
    /// rank, with its "rank").
    #[arg(long, conflicts_with = "rank")]
    every_rank: bool,
}

pub fn run(a: Args) -> Result<()> {
    if let [dir] = a.model.adapter.as_slice() {
        let dir = std::path::Path::new(dir);
        if dir.join(ferrule::tuners::conpet::set::MANIFEST).is_file() {
            return run_conpet(&a, dir);
        }
    }
    let m = a.model.load(ComputeDtypeChoice::Auto)?;
    ferrule::merge::BaseRecord::warn_if_run_elsewhere(
        m.adapters.iter().map(|l| l.dir.as_path()),
        &m.source,
        a.model.quant.spec()?.as_ref(),
    )?;
    let labels = if m.model.task == Task::SeqCls {
        let records = ferrule::data::read_records(&a.data)?;
        let n = m
            .source
            .config
            .get("num_labels")
            .and_then(|v| v.as_u64())
            .unwrap_or(2) as usize;
        let from_data = LabelMap::from_records(&records)?;
        Some(match from_data.names() {
            Some(names) => LabelMap::from_names(names.to_vec())?,
            None => LabelMap::with_num_labels(n),
        })
    } else {
        None
    };
    let opts = EncodeOptions {
        max_len: a.max_len,
        truncation: Truncation::Right,
        completion_only: !a.include_prompt,
    };
    let set = encode_file(&a.data, &m.source, opts, labels.as_ref(), a.limit)?;
    let ranks: Vec<Option<usize>> = match a.every_rank {
        true => m.ranks("--every-rank")?.map(Some).collect(),
        false => vec![a.model.rank],
    };
    for rank in ranks {
        if let Some(b) = rank {
            m.set_rank(b)?;
        }
        let report = evaluate(
            &m.model,
            m.source.pad_token_id()?,
            a.padding,
            &set.items,
            a.batch_size,
            0,
        )?;
        let mut out = serde_json::to_value(&report)?;
        if let Some(o) = out.as_object_mut() {
            o.remove("step");
            o.insert("skipped_records".into(), set.skipped.len().into());
            o.insert("truncated_records".into(), set.truncated.into());
            o.insert("adapter".into(), m.active.clone().into());
            if let Some(b) = rank {
                o.insert("rank".into(), b.into());
            }
            let dtype = m.source.weights.compute_dtype();
            o.insert("compute_dtype".into(), dtype.as_str().into());
        }
        println!("{}", serde_json::to_string(&out)?);
    }
    Ok(())
}

/// A ConPET task set (`--adapter DIR` holding `conpet.json`): the selector routes each record,
/// the experts fill their label columns; accuracy over every task seen, and per task.
fn run_conpet(a: &Args, dir: &std::path::Path) -> Result<()> {
    if a.every_rank || a.model.rank.is_some() {
        anyhow::bail!("--rank / --every-rank: a ConPET set's experts are LoRAs of one rank")
    }
    let set = ferrule::continual::RoutedSet::load(dir, &a.model.model, &super::device())?;
    let report = set.evaluate_file(&a.data, a.max_len, a.batch_size, a.limit)?;
    let mut out = serde_json::to_value(&report)?;
    if let Some(o) = out.as_object_mut() {
        o.insert("adapter".into(), dir.display().to_string().into());
    }
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}

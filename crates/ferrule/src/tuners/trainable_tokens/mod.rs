//! Trainable tokens (peft `tuners/trainable_tokens/`, and `trainable_token_indices` of
//! `LoraConfig`, peft `utils/other.py` `TrainableTokensWrapper`): the listed rows of a token
//! embedding train, the rest of the table stays frozen. Meant for tokens added to a tokenizer,
//! with the embedding grown to hold them (`ModelSource::resize_token_embeddings`).
//!
//! What peft does, and this module with it:
//! - the trained rows start as copies of the table's rows (`init_weights=True`), so the
//!   adapter starts as a no-op; they replace the table's rows in the forward pass;
//! - an output head tied to the embedding (`tie_word_embeddings`) uses the same trained rows
//!   (peft wraps it with a `tied_adapter`);
//! - saved keys, beside LoRA ([`Layout::Wrapped`]): `<path>.token_adapter.trainable_tokens_delta`
//!   (`[n, hidden]`); when the vocabulary was resized (peft's `save_embedding_layers="auto"`
//!   compares the model's `vocab_size` with the base's), also the whole tables: the
//!   embedding's `<path>.token_adapter.base_layer.weight`, a tied head's
//!   `lm_head.token_adapter.base_layer.weight` and its copy of the rows
//!   `lm_head.token_adapter.trainable_tokens_delta`, an untied head's `lm_head.weight`. The
//!   standalone method ([`Layout::Direct`], `standalone.rs`) drops `token_adapter.` and saves the
//!   tied head's copy of the rows even without a resize. Loading uses saved tables in place of
//!   the model's (which must have the same size);
//! - a merge writes the table with the rows replaced (peft `TrainableTokensLayer.merge`).

pub mod config;
pub mod layer;
pub mod standalone;

use std::sync::Mutex;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

pub use config::TokenIndices;
use layer::{TokenRows, TokenRowsEmbedding, TokenRowsHead};
pub use standalone::METHOD;

use super::params::ParamStore;
use super::target::{suffix_match, Targets};
use super::{peft_key, AdaptedModule};
use crate::model::{Embedding, EmbeddingInfo, Linear, LinearInfo};
use crate::ops::{FrozenLinear, FrozenWeight};

/// The tables an adapter trains rows of, and what it took while the model was built.
pub struct TrainableTokens {
    spec: Option<Listed>,
    /// The option in errors: `lora: trainable_token_indices`.
    label: String,
    layout: Layout,
    /// Fresh rows drawn from a standard normal with this run seed, instead of copies of the
    /// table's (the standalone method's `init_weights = false`).
    random_rows: Option<u64>,
    taken: Mutex<Taken>,
}

/// Which tables have which rows trained.
pub enum Listed {
    /// LoRA's `trainable_token_indices`.
    Lora(TokenIndices),
    /// The standalone method: `token_indices` of every module `target_modules` selects.
    Targets {
        targets: Box<Targets>,
        ids: Vec<u32>,
    },
}

/// How the saved keys of a table with trained rows read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Beside another method (LoRA): peft's `TrainableTokensWrapper` puts the layer under
    /// `<path>.token_adapter.`; a tied head's copy of the rows is saved after a resize only.
    Wrapped,
    /// The standalone method: `<path>.trainable_tokens_delta`, `<path>.base_layer.weight`; a
    /// tied head's copy of the rows is always saved.
    Direct,
}

#[derive(Default)]
struct Taken {
    layers: Vec<TakenLayer>,
    /// `(rows in the checkpoint, rows now)` of the input embedding, when it was resized.
    resized: Option<(usize, usize)>,
    /// The `ByModule` keys that matched a module.
    keys_used: Vec<String>,
    /// An untied output head's table, saved with the adapter after a resize (`<path>.weight`).
    head_table: Option<(String, FrozenWeight)>,
}

struct TakenLayer {
    path: String,
    kind: Kind,
    rows: TokenRows,
    /// The table whose rows are replaced: the model's, or the one a saved adapter holds.
    table: FrozenWeight,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// A token embedding.
    Embedding,
    /// An output head sharing the embedding's table and trained rows.
    TiedHead,
    /// An output head with rows of its own (listed by name).
    Head,
}

/// What [`TrainableTokens::linear`] made of a linear layer.
pub enum TokenLinear {
    /// An output head with trainable rows.
    Rows(Box<dyn Linear>),
    /// Not listed: the layer to go on with (a saved adapter's head table after a resize).
    NotListed(FrozenLinear),
}

impl TrainableTokens {
    /// For LoRA's `spec` (none: nothing is trained this way), errors named after `label`.
    pub fn new(spec: Option<&TokenIndices>, label: &str) -> Result<Self> {
        if let Some(s) = spec {
            s.validate(label)?;
        }
        Ok(Self::with(
            spec.cloned().map(Listed::Lora),
            label,
            Layout::Wrapped,
        ))
    }

    /// For `listed` (checked by the caller), saved as `layout` says.
    pub fn with(listed: Option<Listed>, label: &str, layout: Layout) -> Self {
        Self {
            spec: listed,
            label: label.to_string(),
            layout,
            random_rows: None,
            taken: Mutex::new(Taken::default()),
        }
    }

    /// With rows drawn from a standard normal (seeded by `seed` and the key) when `seed` is
    /// given, as peft's `init_weights=False` draws them.
    pub fn random_rows(mut self, seed: Option<u64>) -> Self {
        self.random_rows = seed;
        self
    }

    /// The saved key of `suffix` of the layer at `path`.
    fn key(&self, path: &str, suffix: &str) -> String {
        match self.layout {
            Layout::Wrapped => peft_key(path, &format!("token_adapter.{suffix}")),
            Layout::Direct => peft_key(path, suffix),
        }
    }

    /// The path of the token embedding that got trainable rows, if one did.
    pub fn embedding_path(&self) -> Option<String> {
        let taken = self.taken.lock().unwrap();
        let layer = taken.layers.iter().find(|l| l.kind == Kind::Embedding)?;
        Some(layer.path.clone())
    }

    /// Whether any rows train this way.
    pub fn is_set(&self) -> bool {
        self.spec.is_some()
    }

    /// The ids listed for the module at `path` (`input_embedding`: the model's token
    /// embedding, which the list form names), recording the key that matched.
    fn ids_for(&self, path: &str, input_embedding: bool) -> Option<Vec<u32>> {
        match self.spec.as_ref()? {
            Listed::Lora(TokenIndices::Embedding(ids)) => input_embedding.then(|| ids.clone()),
            Listed::Lora(TokenIndices::ByModule(m)) => {
                let (key, ids) = m.iter().find(|(k, _)| suffix_match(path, k))?;
                self.taken.lock().unwrap().keys_used.push(key.clone());
                Some(ids.clone())
            }
            Listed::Targets { targets, ids } => targets.adapts(path, true).then(|| ids.clone()),
        }
    }

    /// Whether the module at `path` is listed (the token embedding: `input_embedding`).
    fn lists(&self, path: &str, input_embedding: bool) -> bool {
        match &self.spec {
            Some(Listed::Lora(TokenIndices::Embedding(_))) => input_embedding,
            Some(Listed::Lora(TokenIndices::ByModule(m))) => {
                m.keys().any(|k| suffix_match(path, k))
            }
            Some(Listed::Targets { targets, .. }) => targets.adapts(path, true),
            None => false,
        }
    }

    /// Whether the token embedding at `path` gets trainable rows.
    pub fn takes_embedding(&self, path: &str) -> bool {
        self.lists(path, true)
    }

    /// Whether the linear layer of `info` gets trainable rows: listed by name, or tied to an
    /// embedding that has them.
    pub fn takes_linear(&self, info: &LinearInfo) -> bool {
        let listed = self.lists(&info.path, false);
        let tied = info.tied_to.as_ref().is_some_and(|e| {
            let taken = self.taken.lock().unwrap();
            taken.layers.iter().any(|l| &l.path == e)
        });
        listed || tied
    }

    /// The token embedding of `info` with its listed rows trainable (call when
    /// [`TrainableTokens::takes_embedding`]). The rows are the saved adapter's, else copies of
    /// the table's.
    pub fn embedding(
        &self,
        info: &EmbeddingInfo,
        base: FrozenWeight,
        params: &ParamStore,
    ) -> Result<Box<dyn Embedding>> {
        let path = info.path.as_str();
        let ids = self.ids_for(path, true).unwrap_or_default();
        let key = self.key(path, "base_layer.weight");
        let base = self.saved_table(params, &key, base, path)?;
        let resized = info.resized_from.map(|from| (from, base.dims().0));
        self.taken.lock().unwrap().resized = resized;
        let rows = self.rows(params, path, ids, &base)?;
        self.record(path, Kind::Embedding, rows.clone(), base.clone());
        Ok(Box::new(TokenRowsEmbedding::new(
            base,
            info.padding_idx,
            rows,
        )))
    }

    /// An output head with trainable rows: one tied to an embedding with them shares them
    /// (as peft ties it, when the indices agree), one listed by name gets its own. Any other
    /// layer comes back, an untied vocabulary head after a resize with the table a saved
    /// adapter holds for it.
    pub fn linear(
        &self,
        info: &LinearInfo,
        base: FrozenLinear,
        params: &ParamStore,
    ) -> Result<TokenLinear> {
        let path = info.path.as_str();
        let listed = self.ids_for(path, false);
        let tied = info.tied_to.as_ref().and_then(|e| {
            let taken = self.taken.lock().unwrap();
            let layer = taken.layers.iter().find(|l| &l.path == e)?;
            Some(layer.rows.clone())
        });
        if listed.is_some() && !info.is_output_head {
            bail!("{}: {path} is no token embedding or output head; list rows of the embedding (or of the output head) only", self.label)
        }
        let rows = match (listed, tied) {
            (Some(ids), Some(shared)) if ids == shared.indices() => (Kind::TiedHead, shared),
            (None, Some(shared)) => (Kind::TiedHead, shared),
            (Some(ids), _) => {
                let key = self.key(path, "base_layer.weight");
                let table = self.saved_table(params, &key, base.weight().clone(), path)?;
                let head = FrozenLinear::from_weight(table.clone(), None);
                let rows = self.rows(params, path, ids, &table)?;
                self.record(path, Kind::Head, rows.clone(), table);
                return Ok(TokenLinear::Rows(Box::new(TokenRowsHead::new(head, rows)?)));
            }
            (None, None) => {
                return self
                    .untied_head(info, base, params)
                    .map(TokenLinear::NotListed)
            }
        };
        let (kind, rows) = rows;
        // The copies peft saves of a tied head's table and rows are the embedding's.
        for suffix in ["base_layer.weight", "trainable_tokens_delta"] {
            params.take_frozen(&self.key(path, suffix));
        }
        self.record(path, kind, rows.clone(), base.weight().clone());
        Ok(TokenLinear::Rows(Box::new(TokenRowsHead::new(base, rows)?)))
    }

    /// An untied vocabulary head (as many rows as the resized embedding) after a resize: the
    /// saved adapter's table (`<path>.weight`) if it holds one, recorded for saving.
    fn untied_head(
        &self,
        info: &LinearInfo,
        base: FrozenLinear,
        params: &ParamStore,
    ) -> Result<FrozenLinear> {
        let resized = self.taken.lock().unwrap().resized;
        let Some((_, rows)) = resized else {
            return Ok(base);
        };
        if !info.is_output_head || info.tied_to.is_some() || base.out_features() != rows {
            return Ok(base);
        }
        let key = peft_key(&info.path, "weight");
        let table = self.saved_table(params, &key, base.weight().clone(), &info.path)?;
        self.taken.lock().unwrap().head_table = Some((info.path.clone(), table.clone()));
        Ok(FrozenLinear::from_weight(table, base.bias().cloned()))
    }

    /// The table a saved adapter holds under `key` (checked against the model's), else `base`.
    fn saved_table(
        &self,
        params: &ParamStore,
        key: &str,
        base: FrozenWeight,
        path: &str,
    ) -> Result<FrozenWeight> {
        let Some(saved) = params.take_frozen(key) else {
            return Ok(base);
        };
        let (rows, cols) = base.dims();
        if saved.dims() != [rows, cols] {
            bail!(
                "{}: the adapter's table {key:?} is {:?}, but the model's {path} is [{rows}, {cols}]: the adapter was trained with the token embeddings resized to the tokenizer it was trained with; load the model with that tokenizer (its added tokens) so they resize alike",
                self.label,
                saved.dims()
            )
        }
        let saved = saved.to_dtype(DType::F32)?.to_device(params.device())?;
        Ok(FrozenWeight::Dense(saved))
    }

    /// The trainable rows `ids` of `table` (saved, or copies of the table's rows), after
    /// checking each id against the table's size.
    fn rows(
        &self,
        params: &ParamStore,
        path: &str,
        ids: Vec<u32>,
        table: &FrozenWeight,
    ) -> Result<TokenRows> {
        let (rows, hidden) = table.dims();
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= rows) {
            let resized = self.taken.lock().unwrap().resized.is_some();
            let hint = match resized {
                true => "",
                false => "; for tokens added to the tokenizer, resize the embeddings first (--resize-token-embeddings, resize_token_embeddings = true)",
            };
            bail!(
                "{}: token id {id} is past the {rows} rows of {path} (ids 0 to {}){hint}",
                self.label,
                rows.saturating_sub(1)
            )
        }
        let key = self.key(path, "trainable_tokens_delta");
        let device = params.device().clone();
        let seed = self.random_rows.map(|s| crate::init::seed_for(s, &key));
        let delta = params.take_or_init(&key, &[ids.len(), hidden], || {
            if let Some(seed) = seed {
                return crate::init::normal(&[ids.len(), hidden], 1.0, seed, &device);
            }
            let idx = Tensor::new(ids.as_slice(), &device)?;
            Ok(table.rows(&idx)?.to_dtype(DType::F32)?.to_device(&device)?)
        })?;
        Ok(TokenRows::new(ids, delta))
    }

    fn record(&self, path: &str, kind: Kind, rows: TokenRows, table: FrozenWeight) {
        self.taken.lock().unwrap().layers.push(TakenLayer {
            path: path.to_string(),
            kind,
            rows,
            table,
        });
    }

    /// Once the model is built: the list form found the token embedding, and every module
    /// name of the object form matched a module.
    pub fn check_finished(&self) -> Result<()> {
        let taken = self.taken.lock().unwrap();
        match &self.spec {
            None => Ok(()),
            Some(Listed::Lora(TokenIndices::Embedding(_))) if taken.layers.is_empty() => {
                bail!(
                    "{}: the model has no token embedding to train rows of",
                    self.label
                )
            }
            Some(Listed::Targets { .. }) if taken.layers.is_empty() => {
                bail!(
                    "{}: target_modules matched no token embedding or output head of the model",
                    self.label
                )
            }
            Some(Listed::Lora(TokenIndices::Embedding(_)) | Listed::Targets { .. }) => Ok(()),
            Some(Listed::Lora(TokenIndices::ByModule(m))) => {
                match m.keys().find(|k| !taken.keys_used.contains(k)) {
                    Some(k) => bail!(
                        "{}[{k:?}] matched no token embedding or output head of the model",
                        self.label
                    ),
                    None => Ok(()),
                }
            }
        }
    }

    /// What a saved adapter holds beside the trainable rows, under peft's keys (see the
    /// module's documentation): after a resize, the whole tables; a tied head's copy of the
    /// rows after a resize, or always in the standalone layout.
    pub fn saved_tables(&self) -> Result<Vec<(String, Tensor)>> {
        let taken = self.taken.lock().unwrap();
        let resized = taken.resized.is_some();
        let mut out = Vec::new();
        for layer in &taken.layers {
            if resized {
                let table = layer.table.to_dense(layer.rows.delta().device())?;
                let key = self.key(&layer.path, "base_layer.weight");
                out.push((key, table.to_dtype(DType::F32)?));
            }
            if layer.kind == Kind::TiedHead && (resized || self.layout == Layout::Direct) {
                let key = self.key(&layer.path, "trainable_tokens_delta");
                out.push((key, layer.rows.delta().as_tensor().clone()));
            }
        }
        if let Some((path, table)) = &taken.head_table {
            let device = candle_core::Device::Cpu;
            out.push((
                peft_key(path, "weight"),
                table.to_dense(&device)?.to_dtype(DType::F32)?,
            ));
        }
        Ok(out)
    }

    /// The base tensors a merge replaces: each table with its rows replaced (a tied head's
    /// is the embedding's), an untied head's saved table.
    pub fn replaced(&self) -> Result<Vec<(String, Tensor)>> {
        let taken = self.taken.lock().unwrap();
        let mut out = Vec::new();
        for layer in taken.layers.iter().filter(|l| l.kind != Kind::TiedHead) {
            let table = layer.table.to_dense(layer.rows.delta().device())?;
            out.push((
                format!("{}.weight", layer.path),
                layer.rows.replaced_in(&table)?,
            ));
        }
        if let Some((path, table)) = &taken.head_table {
            let device = candle_core::Device::Cpu;
            out.push((
                format!("{path}.weight"),
                table.to_dense(&device)?.to_dtype(DType::F32)?,
            ));
        }
        Ok(out)
    }

    /// The layers with trainable rows, for the report of adapted modules.
    pub fn adapted(&self) -> Vec<AdaptedModule> {
        let taken = self.taken.lock().unwrap();
        taken
            .layers
            .iter()
            .map(|l| {
                let n = l.rows.indices().len();
                let (params, detail) = match l.kind {
                    Kind::TiedHead => {
                        (0, format!("{n} token rows, shared with the tied embedding"))
                    }
                    _ => (
                        l.rows.delta().elem_count(),
                        format!("{n} trainable token rows"),
                    ),
                };
                AdaptedModule {
                    path: l.path.clone(),
                    params,
                    detail,
                }
            })
            .collect()
    }
}

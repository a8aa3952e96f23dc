//! Typed reads of the keys of a JSON config file (`config.json`, `generation_config.json`).

use std::cell::RefCell;
use std::collections::BTreeSet;

use anyhow::{anyhow, Result};
use serde_json::Value;

use crate::util::shown_value as found;

/// Typed reads of a config file's keys. A missing key gives `None` (the caller's documented
/// default); a key of the wrong type, or `null` where transformers gives the key no meaning for
/// `null`, is an error naming the key, the value found and what was expected. (The old pattern,
/// `as_f64().unwrap_or(default)`, silently turned `"rms_norm_eps": "x"` into the default.)
///
/// It remembers the keys asked for, so that [`Keys::note_unread`] can list the rest: unknown
/// keys are kept and ignored, as transformers does, with a debug-level note.
pub(crate) struct Keys<'a> {
    value: &'a Value,
    read: RefCell<BTreeSet<String>>,
}

impl<'a> Keys<'a> {
    pub(crate) fn new(value: &'a Value) -> Self {
        Self {
            value,
            read: RefCell::default(),
        }
    }

    /// The value of `key`, as it is (`None` when missing), remembered as read.
    pub(crate) fn raw(&self, key: &str) -> Option<&'a Value> {
        self.read.borrow_mut().insert(key.to_string());
        self.value.get(key)
    }

    /// A debug-level note naming the keys of the object that nothing asked for.
    pub(crate) fn note_unread(&self, file: &str) {
        let read = self.read.borrow();
        let unread: Vec<&str> = self
            .value
            .as_object()
            .into_iter()
            .flat_map(|o| o.keys())
            .map(String::as_str)
            .filter(|k| !read.contains(*k))
            .collect();
        if !unread.is_empty() {
            tracing::debug!(
                "{file}: keys ferrule does not use (ignored): {}",
                unread.join(", ")
            );
        }
    }

    pub(crate) fn wrong(&self, key: &str, expected: &str) -> anyhow::Error {
        anyhow!(
            "{key:?} is {}, expected {expected}",
            found(&self.value[key])
        )
    }

    /// A non-negative integer (`null` is an error).
    pub(crate) fn usize(&self, key: &str) -> Result<Option<usize>> {
        match self.raw(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|&n| n <= u32::MAX as u64)
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.wrong(key, "a non-negative integer")),
        }
    }

    /// An integer ≥ 1.
    pub(crate) fn count(&self, key: &str) -> Result<Option<usize>> {
        match self.usize(key) {
            Ok(Some(0)) | Err(_) => Err(self.wrong(key, "an integer of at least 1")),
            n => n,
        }
    }

    pub(crate) fn required_count(&self, key: &str) -> Result<usize> {
        self.count(key)?
            .ok_or_else(|| anyhow!("missing {key:?} (an integer of at least 1)"))
    }

    /// A non-negative integer, or `null` meaning none (token ids, `sliding_window`, `head_dim`).
    pub(crate) fn nullable_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.raw(key) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.usize(key),
        }
    }

    /// A finite number.
    pub(crate) fn f64(&self, key: &str) -> Result<Option<f64>> {
        match self.raw(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a finite number")),
        }
    }

    /// A finite number > 0 (epsilons, rope theta and factors).
    pub(crate) fn positive(&self, key: &str) -> Result<Option<f64>> {
        match self.f64(key)? {
            Some(x) if x <= 0.0 => Err(self.wrong(key, "a number greater than 0")),
            x => Ok(x),
        }
    }

    pub(crate) fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.raw(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "true or false")),
        }
    }

    pub(crate) fn str(&self, key: &str) -> Result<Option<&str>> {
        match self.raw(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a string")),
        }
    }

    /// An object, or `null` / missing meaning none (`rope_scaling`, `rope_parameters`).
    pub(crate) fn object(&self, key: &str) -> Result<Option<&Value>> {
        match self.raw(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) if v.is_object() => Ok(Some(v)),
            Some(_) => Err(self.wrong(key, "an object or null")),
        }
    }

    /// A token id below `vocab` (torch's `nn.Embedding` refuses a `padding_idx` outside it); a
    /// negative one counts from the end, as torch reads `padding_idx = -1`.
    pub(crate) fn token_id(&self, key: &str, vocab: usize) -> Result<Option<u32>> {
        if let Some(n) = self.raw(key).and_then(Value::as_i64).filter(|&n| n < 0) {
            return match vocab.checked_sub(n.unsigned_abs() as usize) {
                Some(id) => Ok(Some(id as u32)),
                None => Err(self.wrong(key, &format!("a token id within vocab_size ({vocab})"))),
            };
        }
        match self.nullable_usize(key)? {
            Some(id) if id >= vocab => {
                Err(self.wrong(key, &format!("a token id below vocab_size ({vocab})")))
            }
            id => Ok(id.map(|i| i as u32)),
        }
    }

    /// A token id that indexes nothing (`bos_token_id`, `eos_token_id`): any integer; a negative
    /// one (some conversions write -1) means none, as it can never be generated.
    pub(crate) fn marker_id(&self, key: &str) -> Result<Option<u32>> {
        if self.raw(key).and_then(Value::as_i64).is_some_and(|n| n < 0) {
            return Ok(None);
        }
        Ok(self.nullable_usize(key)?.map(|i| i as u32))
    }
}

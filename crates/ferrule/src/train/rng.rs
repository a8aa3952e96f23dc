//! Deterministic, checkpointable random numbers for training.
//!
//! Resuming a run must reproduce exactly the random decisions an
//! uninterrupted run would have made (data order, dropout masks, ...), so the
//! generator state has to be saved in checkpoints. `rand::rngs::StdRng`
//! (ChaCha12) exposes no serializable state and its algorithm may change
//! between `rand` releases, so ferrule uses its own small generator:
//!
//! * **xoshiro256\*\*** (Blackman & Vigna, "Scrambled linear pseudorandom
//!   number generators", ACM TOMS 2021): 256 bits of state (four `u64`
//!   words, saved verbatim in `trainer_state.json`), period 2^256 − 1,
//!   passes BigCrush, and is a few instructions per output.
//! * **SplitMix64** (Steele, Lea & Flood, "Fast splittable pseudorandom
//!   number generators", OOPSLA 2014) expands a `u64` seed into the four
//!   state words, as recommended by the xoshiro authors, and derives the
//!   seeds of forked streams.
//!
//! Every algorithm built on top (`below`, [`Rng::shuffle`], [`dropout_mask`])
//! is implemented here too, so the sequence of decisions for a given seed is
//! fixed by this file alone and never by a dependency upgrade.

use anyhow::{bail, ensure, Result};
use candle_core::{Device, Shape, Tensor};
use serde::{Deserialize, Serialize};

/// Well-known stream ids for [`Rng::fork`], so that independent consumers of
/// randomness never share (and thereby perturb) one sequence.
pub mod stream {
    /// Order in which training examples are visited each epoch.
    pub const DATA_ORDER: u64 = 1;
    /// Dropout masks.
    pub const DROPOUT: u64 = 2;
    /// Parameter initialization (e.g. LoRA `A` matrices).
    pub const INIT: u64 = 3;
    /// Order of packed bins (`--packing`), forked again per epoch.
    pub const PACKED_BINS: u64 = 4;
}

/// One step of SplitMix64: advances `state` by the golden-ratio increment and
/// returns the mixed output.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xoshiro256\*\* pseudorandom generator with serializable state.
///
/// Serializes as its four state words, e.g. `[1, 2, 3, 4]`; deserializing an
/// all-zero state (a fixed point of the generator) is an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "[u64; 4]", into = "[u64; 4]")]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// Seeds the generator by running SplitMix64 from `seed` for the four
    /// state words (never all zero, since SplitMix64 is a bijection of
    /// distinct consecutive states).
    pub fn seed_from_u64(seed: u64) -> Self {
        let mut sm = seed;
        let s = [
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
        ];
        Self { s }
    }

    /// Restores a generator from words previously returned by [`Rng::state`].
    pub fn from_state(s: [u64; 4]) -> Result<Self> {
        ensure!(s != [0; 4], "invalid RNG state: all four words are zero");
        Ok(Self { s })
    }

    /// Restores a generator from a slice of exactly four words (the form
    /// stored in checkpoints).
    pub fn from_words(words: &[u64]) -> Result<Self> {
        match <[u64; 4]>::try_from(words) {
            Ok(s) => Self::from_state(s),
            Err(_) => bail!("invalid RNG state: expected 4 words, got {}", words.len()),
        }
    }

    /// The current state, to be saved in a checkpoint.
    pub fn state(&self) -> [u64; 4] {
        self.s
    }

    /// Next 64 random bits (xoshiro256\*\*: `rotl(s1 * 5, 7) * 9`).
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Next 32 random bits (the high half of [`Rng::next_u64`], whose
    /// upper bits are the best-scrambled).
    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    /// Uniform `f32` in `[0, 1)` with 24 bits of precision.
    pub fn uniform_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// Uniform `f64` in `[0, 1)` with 53 bits of precision.
    pub fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Unbiased uniform integer in `0..n` (Lemire, "Fast random integer
    /// generation in an interval", ACM TOMACS 2019: multiply-shift with
    /// rejection of the `2^64 mod n` biased low products).
    ///
    /// # Panics
    /// If `n == 0` (an empty range is a caller bug, as in `rand::Rng::gen_range`).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below called with an empty range");
        let mut m = u128::from(self.next_u64()) * u128::from(n);
        if (m as u64) < n {
            let threshold = n.wrapping_neg() % n;
            while (m as u64) < threshold {
                m = u128::from(self.next_u64()) * u128::from(n);
            }
        }
        (m >> 64) as u64
    }

    /// Shuffles `items` in place with the Fisher–Yates (Durstenfeld)
    /// algorithm: for `i` from the end, swap `items[i]` with a uniformly
    /// chosen `items[j]`, `j <= i`.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }

    /// A new generator for the independent stream `stream`, derived from the
    /// current state without advancing `self`.
    ///
    /// Forking the same state with the same id always gives the same child,
    /// and different ids give unrelated children: each state word is offset
    /// by a SplitMix64 output keyed on `stream` and passed through the
    /// SplitMix64 finalizer (a bijection), which lands the child at an
    /// effectively random point of the 2^256 period. Overlap with the parent
    /// or sibling streams is therefore astronomically unlikely (not provably
    /// impossible, unlike xoshiro's `jump`, which only supports small
    /// consecutive stream counts).
    pub fn fork(&self, stream: u64) -> Self {
        let mut key = stream ^ 0xD1B5_4A32_D192_ED03;
        let mut s = [0u64; 4];
        for (out, word) in s.iter_mut().zip(self.s) {
            let mut x = word.wrapping_add(splitmix64(&mut key));
            *out = splitmix64(&mut x);
        }
        if s == [0; 4] {
            // Unreachable in practice (probability 2^-256); keep the
            // invariant anyway.
            s[0] = 1;
        }
        Self { s }
    }
}

impl TryFrom<[u64; 4]> for Rng {
    type Error = anyhow::Error;
    fn try_from(s: [u64; 4]) -> Result<Self> {
        Self::from_state(s)
    }
}

impl From<Rng> for [u64; 4] {
    fn from(rng: Rng) -> Self {
        rng.s
    }
}

/// Lets [`Rng`] drive `rand`/`rand_distr` distributions (e.g. normal
/// initialization). Prefer the inherent methods where the exact algorithm
/// matters for reproducibility, since `rand`'s samplers may change between
/// releases.
impl rand::RngCore for Rng {
    fn next_u32(&mut self) -> u32 {
        Rng::next_u32(self)
    }
    fn next_u64(&mut self) -> u64 {
        Rng::next_u64(self)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let bytes = Rng::next_u64(self).to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> std::result::Result<(), rand::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

/// Inverted-dropout keep mask (Srivastava et al., "Dropout", JMLR 2014, with
/// the train-time rescaling used by `torch.nn.functional.dropout`): each
/// element is `1 / (1 - p)` with probability `1 - p` and `0` with probability
/// `p`, so `x * mask` has the same expectation as `x`.
///
/// Returns an `f32` tensor of `shape` on `device`. `p == 0` gives all ones and
/// `p == 1` all zeros (as torch does); `p` outside `[0, 1]` is an error.
///
/// Each element consumes 32 random bits (two elements per `next_u64`); the
/// element is kept when those bits are `>= round(p * 2^32)`, so the keep
/// probability is exact to within 2^-33. The mask is generated on the host
/// and copied to `device`.
pub fn dropout_mask(
    rng: &mut Rng,
    shape: impl Into<Shape>,
    p: f64,
    device: &Device,
) -> Result<Tensor> {
    let shape = shape.into();
    ensure!(
        (0.0..=1.0).contains(&p),
        "dropout probability must be in [0, 1], got {p}"
    );
    if p == 0.0 {
        return Ok(Tensor::ones(shape, candle_core::DType::F32, device)?);
    }
    if p == 1.0 {
        return Ok(Tensor::zeros(shape, candle_core::DType::F32, device)?);
    }
    let n = shape.elem_count();
    // p in (0, 1) so the product is in (0, 2^32); the cast saturates anyway.
    let threshold = (p * 4_294_967_296.0).round() as u64;
    let scale = (1.0 / (1.0 - p)) as f32;
    let keep = |bits: u64| if bits >= threshold { scale } else { 0.0 };
    let mut values = Vec::with_capacity(n);
    while values.len() < n {
        let r = rng.next_u64();
        values.push(keep(r >> 32));
        if values.len() < n {
            values.push(keep(r & 0xFFFF_FFFF));
        }
    }
    Ok(Tensor::from_vec(values, shape, device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xoshiro_reference_vector() {
        // Reference outputs of xoshiro256** for state [1, 2, 3, 4] (same as
        // the `rand_xoshiro` crate's test vector and Vigna's C code).
        let mut rng = Rng::from_state([1, 2, 3, 4]).unwrap();
        let expected: [u64; 10] = [
            11520,
            0,
            1509978240,
            1215971899390074240,
            1216172134540287360,
            607988272756665600,
            16172922978634559625,
            8476171486693032832,
            10595114339597558777,
            2904607092377533576,
        ];
        for e in expected {
            assert_eq!(rng.next_u64(), e);
        }
    }

    #[test]
    fn splitmix_reference_vector() {
        // Vigna's splitmix64.c, seed 1234567.
        let mut s = 1234567u64;
        let expected: [u64; 5] = [
            6457827717110365317,
            3203168211198807973,
            9817491932198370423,
            4593380528125082431,
            16408922859458223821,
        ];
        for e in expected {
            assert_eq!(splitmix64(&mut s), e);
        }
        let rng = Rng::seed_from_u64(1234567);
        assert_eq!(rng.state(), expected[..4]);
    }

    #[test]
    fn state_round_trip_resumes_sequence() {
        let mut a = Rng::seed_from_u64(42);
        for _ in 0..17 {
            a.next_u64();
        }
        let json = serde_json::to_string(&a).unwrap();
        let mut b: Rng = serde_json::from_str(&json).unwrap();
        let mut c = Rng::from_words(&a.state()).unwrap();
        for _ in 0..100 {
            let x = a.next_u64();
            assert_eq!(x, b.next_u64());
            assert_eq!(x, c.next_u64());
        }
        assert!(serde_json::from_str::<Rng>("[0,0,0,0]").is_err());
        assert!(Rng::from_words(&[1, 2, 3]).is_err());
    }

    #[test]
    fn fork_is_deterministic_and_independent() {
        let root = Rng::seed_from_u64(7);
        let before = root.state();
        let mut d1 = root.fork(stream::DATA_ORDER);
        let mut d2 = root.fork(stream::DATA_ORDER);
        let mut dr = root.fork(stream::DROPOUT);
        assert_eq!(root.state(), before, "fork must not advance the parent");
        let a: Vec<u64> = (0..8).map(|_| d1.next_u64()).collect();
        let b: Vec<u64> = (0..8).map(|_| d2.next_u64()).collect();
        let c: Vec<u64> = (0..8).map(|_| dr.next_u64()).collect();
        let mut p = root.clone();
        let parent: Vec<u64> = (0..8).map(|_| p.next_u64()).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, parent);
        assert_ne!(c, parent);
    }

    #[test]
    fn uniform_ranges_and_mean() {
        let mut rng = Rng::seed_from_u64(1);
        let n = 100_000;
        let mut sum = 0.0;
        for _ in 0..n {
            let x = rng.uniform_f32();
            assert!((0.0..1.0).contains(&x));
            let y = rng.uniform_f64();
            assert!((0.0..1.0).contains(&y));
            sum += y;
        }
        let mean = sum / n as f64;
        assert!((mean - 0.5).abs() < 0.005, "mean {mean}");
    }

    #[test]
    fn below_is_in_range_and_roughly_uniform() {
        let mut rng = Rng::seed_from_u64(3);
        let mut counts = [0usize; 7];
        for _ in 0..70_000 {
            counts[rng.below(7) as usize] += 1;
        }
        for c in counts {
            assert!((9_500..10_500).contains(&c), "{counts:?}");
        }
        assert_eq!(rng.below(1), 0);
        // Huge bound exercises the rejection path's threshold computation.
        let big = u64::MAX / 3 * 2;
        for _ in 0..1000 {
            assert!(rng.below(big) < big);
        }
    }

    #[test]
    fn shuffle_is_a_permutation_and_reproducible() {
        let mut a: Vec<u32> = (0..50).collect();
        let mut b = a.clone();
        Rng::seed_from_u64(9).shuffle(&mut a);
        Rng::seed_from_u64(9).shuffle(&mut b);
        assert_eq!(a, b);
        assert_ne!(a, (0..50).collect::<Vec<_>>());
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        let mut empty: [u8; 0] = [];
        Rng::seed_from_u64(0).shuffle(&mut empty);
        let mut one = [5];
        Rng::seed_from_u64(0).shuffle(&mut one);
        assert_eq!(one, [5]);
    }

    #[test]
    fn rngcore_fill_bytes_matches_words() {
        use rand::RngCore;
        let mut a = Rng::seed_from_u64(11);
        let mut b = a.clone();
        let mut buf = [0u8; 12];
        a.fill_bytes(&mut buf);
        let w0 = b.next_u64().to_le_bytes();
        let w1 = b.next_u64().to_le_bytes();
        assert_eq!(&buf[..8], &w0);
        assert_eq!(&buf[8..], &w1[..4]);
    }

    #[test]
    fn dropout_mask_values_and_rate() {
        let dev = Device::Cpu;
        let mut rng = Rng::seed_from_u64(5);
        let p = 0.25;
        let m = dropout_mask(&mut rng, (100, 1001), p, &dev).unwrap();
        assert_eq!(m.dims(), &[100, 1001]);
        assert_eq!(m.dtype(), candle_core::DType::F32);
        let v = m.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = (1.0 / (1.0 - p)) as f32;
        let kept = v.iter().filter(|&&x| x == scale).count();
        let dropped = v.iter().filter(|&&x| x == 0.0).count();
        assert_eq!(kept + dropped, v.len());
        let rate = dropped as f64 / v.len() as f64;
        assert!((rate - p).abs() < 0.005, "drop rate {rate}");
        // Mean of the mask is ~1 (inverted dropout preserves expectation).
        let mean: f64 = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        assert!((mean - 1.0).abs() < 0.01, "mean {mean}");

        // Same seed => same mask.
        let m2 = dropout_mask(&mut Rng::seed_from_u64(5), (100, 1001), p, &dev).unwrap();
        assert_eq!(v, m2.flatten_all().unwrap().to_vec1::<f32>().unwrap());

        let ones = dropout_mask(&mut rng, 4, 0.0, &dev).unwrap();
        assert_eq!(ones.to_vec1::<f32>().unwrap(), vec![1.0; 4]);
        let zeros = dropout_mask(&mut rng, 4, 1.0, &dev).unwrap();
        assert_eq!(zeros.to_vec1::<f32>().unwrap(), vec![0.0; 4]);
        assert!(dropout_mask(&mut rng, 4, 1.5, &dev).is_err());
        assert!(dropout_mask(&mut rng, 4, f64::NAN, &dev).is_err());
        assert!(dropout_mask(&mut rng, 4, -0.1, &dev).is_err());
    }
}

//! TensorBoard event files for `report_to = ["tensorboard"]` (`--report-to tensorboard`, as
//! transformers' `TrainingArguments.report_to`): the scalars `train/loss`,
//! `train/learning_rate`, `train/grad_norm`, `train/epoch`, `train/tokens_per_second` every
//! step and `eval/loss`, `eval/perplexity` or `eval/accuracy` at every evaluation, with
//! transformers' tag names.
//!
//! Layout: one file `events.out.tfevents.<unix time>.<host>.<pid>.0` per invocation (the
//! name TensorBoard's and PyTorch's writers use) in `<output_dir>/runs/`, transformers'
//! default `logging_dir` without its per-invocation subfolder: a resumed run adds a file to
//! the same folder, so TensorBoard (`tensorboard --logdir <output_dir>/runs`) draws one run.
//!
//! Written by hand rather than with a crate: scalars need three protobuf fields, while the
//! crates that write event files (`tensorboard-rs`, `tboard`) bring protobuf code generators,
//! image codecs or a second CRC crate for them. The format, from TensorFlow's sources:
//! - framing (`tensorflow/core/lib/io/record_writer.cc`, "TFRecord"): per record, the length
//!   as u64 little-endian, the masked CRC-32C of those 8 bytes (u32 LE), the data, the masked
//!   CRC-32C of the data; mask (`tensorflow/core/lib/hash/crc32c.h`):
//!   `((crc >> 15) | (crc << 17)) + 0xa282ead8`;
//! - each record an `Event` (`tensorflow/core/util/event.proto`): `wall_time = 1` (double),
//!   `step = 2` (int64), `file_version = 3` (string, "brain.Event:2" in the first record),
//!   `summary = 5`; `Summary` (`tensorflow/core/framework/summary.proto`): `repeated Value
//!   value = 1`; `Value`: `tag = 1` (string), `simple_value = 2` (float).
//!
//! `scripts/check-interop.sh` reads a run's files back with the `tensorboard` package.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::config::{ReportTo, TrainConfig};
use super::report::{EvalReport, Progress, StepReport};

/// The folder of the output folder that holds the event files.
pub const RUNS_DIR: &str = "runs";

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), table-driven.
fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    !data.iter().fold(!0u32, |crc, &b| {
        TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8)
    })
}

/// TFRecord's masked CRC (see the module doc).
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: length, its CRC, the data, its CRC.
fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited protobuf field (wire type 2).
fn bytes_field(field: u32, data: &[u8], out: &mut Vec<u8>) {
    varint(((field as u64) << 3) | 2, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

/// An `Event` with `wall_time` and `step`, and either a file version or one scalar.
fn event(wall_time: f64, step: i64, body: EventBody) -> Vec<u8> {
    let mut out = Vec::new();
    varint((1 << 3) | 1, &mut out); // wall_time: fixed64
    out.extend_from_slice(&wall_time.to_le_bytes());
    varint(2 << 3, &mut out); // step: varint (int64, two's complement)
    varint(step as u64, &mut out);
    match body {
        EventBody::FileVersion(v) => bytes_field(3, v.as_bytes(), &mut out),
        EventBody::Scalar(tag, value) => {
            let mut v = Vec::new();
            bytes_field(1, tag.as_bytes(), &mut v);
            varint((2 << 3) | 5, &mut v); // simple_value: fixed32 float
            v.extend_from_slice(&value.to_le_bytes());
            let mut summary = Vec::new();
            bytes_field(1, &v, &mut summary);
            bytes_field(5, &summary, &mut out);
        }
    }
    out
}

enum EventBody<'a> {
    FileVersion(&'a str),
    Scalar(&'a str, f32),
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Writes scalars to a new event file.
pub struct EventWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir` (created when missing), named as TensorBoard's writers name
    /// theirs, starting with the file-version record.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the TensorBoard folder {}", dir.display()))?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty() && !h.contains(['/', '\\']))
            .unwrap_or_else(|| "localhost".into());
        let wall = now();
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}.{}.0",
            wall as u64,
            std::process::id()
        ));
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut w = Self {
            file: BufWriter::new(file),
            path,
        };
        w.record(&event(wall, 0, EventBody::FileVersion("brain.Event:2")))?;
        Ok(w)
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn record(&mut self, event: &[u8]) -> Result<()> {
        self.file
            .write_all(&frame(event))
            .with_context(|| format!("writing {}", self.path.display()))
    }

    /// One scalar (TensorBoard keeps 32-bit floats).
    pub fn scalar(&mut self, tag: &str, step: u64, value: f64) -> Result<()> {
        self.record(&event(
            now(),
            step as i64,
            EventBody::Scalar(tag, value as f32),
        ))
    }

    /// Pushes what was written to the file (so a running TensorBoard sees it).
    pub fn flush(&mut self) -> Result<()> {
        self.file
            .flush()
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// The records of an event file, each checked against its two CRCs.
pub fn read_records(bytes: &[u8]) -> Result<Vec<&[u8]>> {
    let mut records = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        if rest.len() < 12 {
            bail!(
                "a truncated record header at byte {}",
                bytes.len() - rest.len()
            )
        }
        let (len_bytes, crc) = (&rest[..8], &rest[8..12]);
        if masked_crc(len_bytes).to_le_bytes() != crc {
            bail!("a record length's CRC does not match")
        }
        let len = u64::from_le_bytes(len_bytes.try_into()?) as usize;
        let end = 12usize
            .checked_add(len)
            .filter(|&e| e + 4 <= rest.len())
            .context("a truncated record")?;
        let data = &rest[12..end];
        if masked_crc(data).to_le_bytes() != rest[end..end + 4] {
            bail!("a record's CRC does not match its data")
        }
        records.push(data);
        rest = &rest[end + 4..];
    }
    Ok(records)
}

/// One scalar read back: step, tag, value.
pub type Scalar = (i64, String, f32);

/// The scalars of an event file's records (other events are skipped).
pub fn read_scalars(path: &Path) -> Result<Vec<Scalar>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for record in read_records(&bytes).with_context(|| format!("{}", path.display()))? {
        let mut step = 0;
        for (field, value) in fields(record)? {
            match (field, value) {
                (2, Field::Varint(v)) => step = v as i64,
                (5, Field::Bytes(summary)) => {
                    for (_, value) in fields(summary)? {
                        if let Field::Bytes(v) = value {
                            let (mut tag, mut x) = (String::new(), None);
                            for (f, item) in fields(v)? {
                                match (f, item) {
                                    (1, Field::Bytes(t)) => tag = String::from_utf8(t.to_vec())?,
                                    (2, Field::Fixed32(b)) => x = Some(f32::from_le_bytes(b)),
                                    _ => {}
                                }
                            }
                            if let Some(x) = x {
                                out.push((step, tag, x));
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Ok(out)
}

enum Field<'a> {
    Varint(u64),
    Fixed64,
    Fixed32([u8; 4]),
    Bytes(&'a [u8]),
}

/// A protobuf message's fields, in order (the wire types events use).
fn fields(mut msg: &[u8]) -> Result<Vec<(u64, Field<'_>)>> {
    fn read_varint(msg: &mut &[u8]) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = msg.split_first().context("a truncated varint")?;
            *msg = rest;
            v |= ((b & 0x7f) as u64) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        bail!("a varint longer than 10 bytes")
    }
    fn take<'m>(msg: &mut &'m [u8], n: usize) -> Result<&'m [u8]> {
        if msg.len() < n {
            bail!("a truncated field")
        }
        let (head, rest) = msg.split_at(n);
        *msg = rest;
        Ok(head)
    }
    let mut out = Vec::new();
    while !msg.is_empty() {
        let key = read_varint(&mut msg)?;
        let value = match key & 7 {
            0 => Field::Varint(read_varint(&mut msg)?),
            1 => {
                take(&mut msg, 8)?;
                Field::Fixed64
            }
            2 => {
                let n = read_varint(&mut msg)? as usize;
                Field::Bytes(take(&mut msg, n)?)
            }
            5 => Field::Fixed32(take(&mut msg, 4)?.try_into()?),
            w => bail!("protobuf wire type {w} is not used by events"),
        };
        out.push((key >> 3, value));
    }
    Ok(out)
}

/// A [`Progress`] that passes everything on to `inner` and, when the run reports to
/// TensorBoard, writes each step's and evaluation's scalars. The event file is opened when
/// the run starts (the output folder exists then); a file that cannot be written is a
/// warning, not the end of the run.
pub struct Reporter<'a> {
    inner: &'a mut dyn Progress,
    /// The folder of the event files, when the run reports to TensorBoard.
    dir: Option<PathBuf>,
    writer: Option<EventWriter>,
}

impl<'a> Reporter<'a> {
    /// Reports as `cfg.report_to` asks on rank 0 (the other ranks write nothing).
    pub fn for_run(inner: &'a mut dyn Progress, cfg: &TrainConfig, rank: usize) -> Self {
        let dir = (rank == 0 && cfg.report_to.contains(&ReportTo::Tensorboard))
            .then(|| cfg.output_dir.join(RUNS_DIR));
        Self {
            inner,
            dir,
            writer: None,
        }
    }

    /// Writes `scalars` at `step`; on an error, warns once and writes no more.
    fn write(&mut self, step: usize, scalars: &[(&str, Option<f64>)]) {
        let Some(w) = &mut self.writer else {
            return;
        };
        let written: Result<()> = scalars
            .iter()
            .filter_map(|&(tag, v)| v.map(|v| (tag, v)))
            .try_for_each(|(tag, v)| w.scalar(tag, step as u64, v))
            .and_then(|_| w.flush());
        if let Err(e) = written {
            self.writer = None;
            self.warn(&format!("TensorBoard events no longer written: {e:#}"));
        }
    }

    /// A warning on the progress display and in the log (which `-q` does not hide).
    fn warn(&mut self, text: &str) {
        tracing::warn!("{text}");
        self.inner.message(&format!("warning: {text}"));
    }
}

impl Progress for Reporter<'_> {
    fn start(&mut self, total_steps: usize, first_step: usize) {
        if let Some(dir) = &self.dir {
            match EventWriter::create(dir) {
                Ok(w) => self.writer = Some(w),
                Err(e) => self.warn(&format!("TensorBoard events not written: {e:#}")),
            }
        }
        self.inner.start(total_steps, first_step);
    }

    fn step(&mut self, r: &StepReport) {
        self.write(
            r.step,
            &[
                ("train/loss", Some(r.loss)),
                ("train/learning_rate", Some(r.lr)),
                ("train/grad_norm", Some(r.grad_norm)),
                ("train/epoch", Some(r.epoch)),
                ("train/tokens_per_second", Some(r.tokens_per_sec)),
            ],
        );
        self.inner.step(r);
    }

    fn eval_start(&mut self, records: usize) {
        self.inner.eval_start(records);
    }

    fn eval(&mut self, r: &EvalReport) {
        self.write(
            r.step,
            &[
                ("eval/loss", Some(r.eval_loss)),
                ("eval/perplexity", r.eval_perplexity),
                ("eval/accuracy", r.eval_accuracy),
            ],
        );
        self.inner.eval(r);
    }

    fn message(&mut self, text: &str) {
        self.inner.message(text);
    }

    fn warning(&mut self, text: &str) {
        self.inner.warning(text);
    }

    fn finish(&mut self) {
        self.writer = None; // every write was flushed

        self.inner.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CRC-32C check value of "123456789" (RFC 3720, appendix B.4).
    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn scalars_read_back_with_checked_crcs() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalar("train/loss", 1, 2.5).unwrap();
        w.scalar("eval/loss", 300, 0.125).unwrap();
        w.flush().unwrap();
        let path = w.path().to_path_buf();
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        assert_eq!(
            read_scalars(&path).unwrap(),
            vec![
                (1, "train/loss".to_string(), 2.5),
                (300, "eval/loss".to_string(), 0.125)
            ]
        );
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(
            read_records(&bytes).unwrap().len(),
            3,
            "version + 2 scalars"
        );
        // A flipped bit anywhere is caught by a CRC.
        let mut bad = bytes.clone();
        let last = bad.len() - 6;
        bad[last] ^= 1;
        assert!(read_records(&bad).is_err());
        let mut bad = bytes;
        bad[3] ^= 1;
        assert!(read_records(&bad).is_err());
    }
}

//! Training metrics: a JSON-lines log that stays consistent across resumes,
//! and a tokens/second meter.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::util::atomic::write_bytes_atomic;

/// Conventional file name of the log inside the output directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Append-only `metrics.jsonl` writer: one JSON object per line, each with an
/// integer `"step"` key first.
///
/// Every record is written with a single `write` call on a file opened in
/// append mode, so it reaches the OS immediately (no user-space buffering);
/// lines are not `fsync`ed individually. After a crash, at most the last line
/// can be torn, and [`MetricsLog::resume`] discards it.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Starts a fresh log at `path`, truncating any existing file.
    pub fn create(path: &Path) -> Result<Self> {
        write_bytes_atomic(path, b"").with_context(|| format!("creating {}", path.display()))?;
        Self::open_append(path)
    }

    /// Continues the log of a run resumed from the checkpoint at
    /// `resumed_step`: records with `"step" > resumed_step` (written after
    /// that checkpoint by the interrupted run) are dropped, so that once the
    /// resumed run re-logs those steps the file equals that of an
    /// uninterrupted run. Kept lines are preserved byte for byte; the file is
    /// rewritten atomically. A missing file starts an empty log.
    ///
    /// A torn (unparsable) final line is dropped; an unparsable line
    /// elsewhere is an error. Lines without an integer `"step"` are kept.
    pub fn resume(path: &Path, resumed_step: u64) -> Result<Self> {
        let text = match std::fs::read(path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let lines: Vec<&str> = text.lines().collect();
        let mut kept = String::with_capacity(text.len());
        for (i, line) in lines.iter().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let value: Value = match serde_json::from_str(line) {
                Ok(v) => v,
                Err(_) if i + 1 == lines.len() => {
                    tracing::warn!(path = %path.display(), "dropping torn last line of metrics log");
                    continue;
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("{} line {} is not valid JSON", path.display(), i + 1)
                    })
                }
            };
            let step = value.get("step").and_then(Value::as_u64);
            if step.is_none_or(|s| s <= resumed_step) {
                kept.push_str(line);
                kept.push('\n');
            }
        }
        write_bytes_atomic(path, kept.as_bytes())
            .with_context(|| format!("rewriting {}", path.display()))?;
        Self::open_append(path)
    }

    fn open_append(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `{"step": step, ...fields}`. `fields` must serialize to a JSON
    /// object (or `null` for none); a `"step"` field in it must equal `step`.
    pub fn log<T: Serialize + ?Sized>(&mut self, step: u64, fields: &T) -> Result<()> {
        let fields = serde_json::to_value(fields).context("serializing metrics")?;
        let mut record = Map::new();
        record.insert("step".to_string(), Value::from(step));
        match fields {
            Value::Object(map) => {
                for (k, v) in map {
                    if k == "step" {
                        if v.as_u64() != Some(step) {
                            bail!("metrics record has \"step\" {v} but is logged at step {step}");
                        }
                        continue;
                    }
                    record.insert(k, v);
                }
            }
            Value::Null => {}
            other => bail!("metrics must serialize to a JSON object, got {other}"),
        }
        let mut line = serde_json::to_string(&Value::Object(record))?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .with_context(|| format!("appending to {}", self.path.display()))
    }

    /// Forces logged lines to stable storage (e.g. before a checkpoint).
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .with_context(|| format!("syncing {}", self.path.display()))
    }
}

/// Reads every record of a metrics log (skipping blank lines).
pub fn read_metrics(path: &Path) -> Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{} line {} is not valid JSON", path.display(), i + 1))
        })
        .collect()
}

/// Tokens-per-second meter over a sliding window of recent steps and over
/// the whole run.
///
/// Time is measured between consecutive [`Throughput::record`] calls (or
/// from construction / [`Throughput::restart_clock`]), so pauses such as
/// evaluation or checkpointing can be excluded by restarting the clock after
/// them. Rates are `sum(tokens) / sum(durations)`.
#[derive(Debug, Clone)]
pub struct Throughput {
    window: usize,
    recent: VecDeque<(u64, Duration)>,
    window_tokens: u64,
    window_time: Duration,
    total_tokens: u64,
    total_time: Duration,
    last: Instant,
}

impl Throughput {
    /// A meter averaging over the last `window` records (at least 1).
    pub fn new(window: usize) -> Self {
        Self {
            window: window.max(1),
            recent: VecDeque::new(),
            window_tokens: 0,
            window_time: Duration::ZERO,
            total_tokens: 0,
            total_time: Duration::ZERO,
            last: Instant::now(),
        }
    }

    /// Restarts the clock so the time since the last record is not counted.
    pub fn restart_clock(&mut self) {
        self.last = Instant::now();
    }

    /// Records `tokens` processed since the previous record (or clock start).
    pub fn record(&mut self, tokens: u64) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last);
        self.last = now;
        self.record_with_duration(tokens, elapsed);
    }

    /// Records `tokens` processed in `elapsed` (for externally timed steps).
    pub fn record_with_duration(&mut self, tokens: u64, elapsed: Duration) {
        self.recent.push_back((tokens, elapsed));
        self.window_tokens += tokens;
        self.window_time += elapsed;
        if self.recent.len() > self.window {
            if let Some((t, d)) = self.recent.pop_front() {
                self.window_tokens -= t;
                self.window_time -= d;
            }
        }
        self.total_tokens += tokens;
        self.total_time += elapsed;
    }

    /// Tokens/s over the last `window` records; `None` before any time has
    /// been recorded.
    pub fn window_tokens_per_sec(&self) -> Option<f64> {
        rate(self.window_tokens, self.window_time)
    }

    /// Tokens/s over everything recorded; `None` before any time has been
    /// recorded.
    pub fn overall_tokens_per_sec(&self) -> Option<f64> {
        rate(self.total_tokens, self.total_time)
    }

    /// Total tokens recorded.
    pub fn total_tokens(&self) -> u64 {
        self.total_tokens
    }

    /// Total time recorded.
    pub fn total_time(&self) -> Duration {
        self.total_time
    }
}

fn rate(tokens: u64, time: Duration) -> Option<f64> {
    let secs = time.as_secs_f64();
    (secs > 0.0).then(|| tokens as f64 / secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn log_steps(log: &mut MetricsLog, steps: std::ops::RangeInclusive<u64>) {
        for s in steps {
            log.log(s, &json!({"loss": 1.0 / s as f64, "lr": 1e-4}))
                .unwrap();
            if s % 4 == 0 {
                log.log(s, &json!({"eval_loss": 0.5})).unwrap();
            }
        }
    }

    #[test]
    fn resumed_log_equals_uninterrupted() {
        let dir = tempfile::tempdir().unwrap();
        let full = dir.path().join("full.jsonl");
        let mut log = MetricsLog::create(&full).unwrap();
        log_steps(&mut log, 1..=10);
        drop(log);

        let resumed = dir.path().join("resumed.jsonl");
        let mut log = MetricsLog::create(&resumed).unwrap();
        log_steps(&mut log, 1..=7);
        drop(log);
        // Crash mid-write of a line.
        let mut f = OpenOptions::new().append(true).open(&resumed).unwrap();
        f.write_all(b"{\"step\": 8, \"lo").unwrap();
        drop(f);
        // Resume from the checkpoint at step 4 (steps 5..=7 were lost).
        let mut log = MetricsLog::resume(&resumed, 4).unwrap();
        log_steps(&mut log, 5..=10);
        drop(log);
        assert_eq!(
            std::fs::read(&full).unwrap(),
            std::fs::read(&resumed).unwrap()
        );

        let records = read_metrics(&full).unwrap();
        assert_eq!(records.len(), 12);
        assert_eq!(records[0], json!({"step": 1, "loss": 1.0, "lr": 1e-4}));
        // "step" comes first in every line.
        let text = std::fs::read_to_string(&full).unwrap();
        assert!(text.lines().all(|l| l.starts_with("{\"step\":")));
    }

    #[test]
    fn resume_without_file_and_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(METRICS_FILE);
        let mut log = MetricsLog::resume(&p, 3).unwrap();
        log.log(4, &json!({"a": 1})).unwrap();
        log.sync().unwrap();
        assert_eq!(read_metrics(&p).unwrap(), vec![json!({"step": 4, "a": 1})]);

        std::fs::write(&p, "{\"step\": 1}\nnot json\n{\"step\": 2}\n").unwrap();
        let err = MetricsLog::resume(&p, 5).unwrap_err();
        assert!(format!("{err:#}").contains("line 2"), "{err:#}");
    }

    #[test]
    fn log_validates_fields() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(METRICS_FILE);
        let mut log = MetricsLog::create(&p).unwrap();
        log.log(1, &json!({"step": 1, "x": 2})).unwrap();
        log.log(2, &()).unwrap();
        assert!(log.log(3, &json!({"step": 4})).is_err());
        assert!(log.log(3, &json!([1, 2])).is_err());
        #[derive(Serialize)]
        struct M {
            loss: f32,
            grad_norm: f64,
        }
        log.log(
            5,
            &M {
                loss: 0.5,
                grad_norm: 2.0,
            },
        )
        .unwrap();
        assert_eq!(
            read_metrics(&p).unwrap(),
            vec![
                json!({"step": 1, "x": 2}),
                json!({"step": 2}),
                json!({"step": 5, "loss": 0.5, "grad_norm": 2.0})
            ]
        );
    }

    #[test]
    fn throughput_window_and_overall() {
        let mut t = Throughput::new(2);
        assert_eq!(t.window_tokens_per_sec(), None);
        t.record_with_duration(100, Duration::from_secs(1));
        t.record_with_duration(300, Duration::from_secs(1));
        t.record_with_duration(500, Duration::from_secs(3));
        // window: (300 + 500) / 4 s; overall: 900 / 5 s
        assert_eq!(t.window_tokens_per_sec(), Some(200.0));
        assert_eq!(t.overall_tokens_per_sec(), Some(180.0));
        assert_eq!(t.total_tokens(), 900);
        assert_eq!(t.total_time(), Duration::from_secs(5));
        t.restart_clock();
        t.record(10);
        assert_eq!(t.total_tokens(), 910);
    }
}

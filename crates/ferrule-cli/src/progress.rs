//! Training progress: a bar (step, loss, tokens/s, ETA) on a terminal; plain lines for the
//! first step and every `--log-every` steps when stderr is not one (nohup, CI, a file), where
//! a bar shows nothing. Messages (evaluations, warnings) go above the bar, or plain to stderr.

use std::io::IsTerminal;

use ferrule::train::{EvalReport, Progress, StepReport};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Bar {
    bar: Option<ProgressBar>,
    quiet: bool,
    /// `Some(n)`: no bar; a line for the first step of this process, every n steps and the last.
    lines_every: Option<usize>,
    /// Seconds of the steps run in this process, and their count (the ETA).
    elapsed: f64,
    steps_run: usize,
}

impl Bar {
    /// A bar when stderr is a terminal, else lines every `log_every` steps.
    pub fn new(quiet: bool, log_every: usize) -> Self {
        let lines_every = (!std::io::stderr().is_terminal()).then_some(log_every.max(1));
        Self {
            bar: None,
            quiet,
            lines_every,
            elapsed: 0.0,
            steps_run: 0,
        }
    }
}

/// `1:02:03` from seconds.
pub fn clock(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// One plain progress line.
pub fn step_line(r: &StepReport, eta_secs: f64) -> String {
    format!(
        "step {}/{}  loss {:.4}  lr {:.2e}  grad_norm {:.3}  {:.0} tok/s  eta {}",
        r.step,
        r.total_steps,
        r.loss,
        r.lr,
        r.grad_norm,
        r.tokens_per_sec,
        clock(eta_secs)
    )
}

impl Progress for Bar {
    fn start(&mut self, total_steps: usize, first_step: usize) {
        let hidden = self.quiet || self.lines_every.is_some();
        let bar = ProgressBar::with_draw_target(
            Some(total_steps as u64),
            if hidden {
                ProgressDrawTarget::hidden()
            } else {
                ProgressDrawTarget::stderr()
            },
        );
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30.cyan/blue} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_position(first_step as u64);
        self.bar = Some(bar);
    }

    fn step(&mut self, r: &StepReport) {
        self.elapsed += r.step_seconds;
        self.steps_run += 1;
        if let (Some(every), false) = (self.lines_every, self.quiet) {
            // The first step too: at 10 steps of a few seconds, the first line would come late.
            if self.steps_run == 1 || r.step.is_multiple_of(every) || r.step == r.total_steps {
                let eta = self.elapsed / self.steps_run as f64
                    * r.total_steps.saturating_sub(r.step) as f64;
                eprintln!("{}", step_line(r, eta));
            }
        }
        if let Some(b) = &self.bar {
            b.set_position(r.step as u64);
            b.set_message(format!(
                "loss {:.4}  lr {:.2e}  {:.0} tok/s",
                r.loss, r.lr, r.tokens_per_sec
            ));
        }
    }

    fn eval_start(&mut self, records: usize) {
        self.message(&format!(
            "evaluating {records} record{}",
            if records == 1 { "" } else { "s" }
        ));
    }

    fn eval(&mut self, r: &EvalReport) {
        let text = match r.eval_accuracy {
            Some(acc) => format!(
                "step {}: eval loss {:.4}, accuracy {:.2}%",
                r.step,
                r.eval_loss,
                100.0 * acc
            ),
            None => format!(
                "step {}: eval loss {:.4}, perplexity {:.2}",
                r.step,
                r.eval_loss,
                r.eval_perplexity.unwrap_or(f64::NAN)
            ),
        };
        self.message(&text);
    }

    fn message(&mut self, text: &str) {
        if self.quiet {
            return;
        }
        match &self.bar {
            // A bar that is drawn (stderr is a terminal) prints above itself.
            Some(b) if self.lines_every.is_none() => b.println(text),
            _ => eprintln!("{text}"),
        }
    }

    fn finish(&mut self) {
        let Some(b) = self.bar.take() else {
            return;
        };
        // An interrupted run's bar stays where the run stopped; `finish` would fill it.
        if b.length().is_some_and(|len| b.position() < len) {
            b.abandon();
        } else {
            b.finish();
        }
        if !b.is_hidden() {
            // The bar's line ends without a newline: what is printed next starts a line.
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_line_names_every_figure() {
        let r = StepReport {
            step: 20,
            total_steps: 100,
            epoch: 0.5,
            loss: 2.34567,
            lr: 2e-4,
            grad_norm: 0.5,
            tokens: 1000,
            tokens_per_sec: 1234.4,
            positions_per_sec: 2000.0,
            step_seconds: 0.8,
        };
        assert_eq!(
            step_line(&r, 3725.0),
            "step 20/100  loss 2.3457  lr 2.00e-4  grad_norm 0.500  1234 tok/s  eta 1:02:05"
        );
    }
}

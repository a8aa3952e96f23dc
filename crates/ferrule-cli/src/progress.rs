//! A terminal progress bar (step, loss, tokens/s, ETA) for training runs.

use ferrule::train::{EvalReport, Progress, StepReport};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Bar {
    bar: Option<ProgressBar>,
    quiet: bool,
}

impl Bar {
    pub fn new(quiet: bool) -> Self {
        Self { bar: None, quiet }
    }
}

impl Progress for Bar {
    fn start(&mut self, total_steps: usize, first_step: usize) {
        let bar = ProgressBar::with_draw_target(Some(total_steps as u64), if self.quiet { ProgressDrawTarget::hidden() } else { ProgressDrawTarget::stderr() });
        bar.set_style(
            ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_position(first_step as u64);
        self.bar = Some(bar);
    }

    fn step(&mut self, r: &StepReport) {
        if let Some(b) = &self.bar {
            b.set_position(r.step as u64);
            b.set_message(format!("loss {:.4}  lr {:.2e}  {:.0} tok/s", r.loss, r.lr, r.tokens_per_sec));
        }
    }

    fn eval(&mut self, r: &EvalReport) {
        let text = match r.eval_accuracy {
            Some(acc) => format!("step {}: eval loss {:.4}, accuracy {:.2}%", r.step, r.eval_loss, 100.0 * acc),
            None => format!("step {}: eval loss {:.4}, perplexity {:.2}", r.step, r.eval_loss, r.eval_perplexity.unwrap_or(f64::NAN)),
        };
        self.message(&text);
    }

    fn message(&mut self, text: &str) {
        if self.quiet {
            return;
        }
        match &self.bar {
            Some(b) => b.println(text),
            None => eprintln!("{text}"),
        }
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish();
        }
    }
}

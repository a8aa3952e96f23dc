//! ConPET task sets as users run them (the method's own pieces are in
//! [`crate::tuners::conpet`]): [`add_task`] trains a new split into a set, phase by phase with
//! the ordinary trainer, and [`RoutedSet`] runs a set: the selector routes each record to its
//! top-k experts, whose heads fill their own label columns.

mod routed;
mod train;

pub use routed::{RoutedSet, SetEval, TaskEval};
pub use train::{add_task, ContinualSummary};

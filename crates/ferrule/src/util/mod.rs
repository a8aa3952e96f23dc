//! Small, dependency-light utilities shared by the rest of the crate.

pub mod atomic;

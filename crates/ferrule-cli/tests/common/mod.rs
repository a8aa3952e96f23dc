//! Helpers shared by the command-line tests.

/// A path under the repository's `tests/fixtures`, as a string for the command line.
pub fn fx(rel: &str) -> String {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(rel)
        .display()
        .to_string()
}

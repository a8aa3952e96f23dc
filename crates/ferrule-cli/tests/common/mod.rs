//! Helpers shared by the command-line tests.

/// A path under the repository's `tests/fixtures`, as a string for the command line.
#[allow(dead_code)] // each test file is its own crate, and not every one names fixtures
pub fn fx(rel: &str) -> String {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(rel)
        .display()
        .to_string()
}

/// Runs the ferrule binary with `args` on one thread: (success, stdout, stderr). A panic is
/// never an answer to any input, so one fails the test.
#[allow(dead_code)] // each test file is its own crate, and not every one runs the binary this way
pub fn ferrule(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferrule"))
        .args(args)
        .args(["--threads", "1"])
        .output()
        .expect("run ferrule");
    let (ok, stdout, stderr) = (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        !stderr.contains("panicked"),
        "panic for {args:?}:\n{stderr}"
    );
    (ok, stdout, stderr)
}

/// Runs `args`, which must fail with `needle` in the error.
#[allow(dead_code)]
pub fn fails_with(args: &[&str], needle: &str) {
    let (ok, _, err) = ferrule(args);
    assert!(!ok, "expected failure for {args:?}");
    assert!(
        err.contains(needle),
        "error for {args:?} should mention {needle:?}, got:\n{err}"
    );
}

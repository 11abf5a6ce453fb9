//! `skeinctl`: see the crate documentation.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "skeinctl: the admin API is not in this build yet; watch the node's log and /metrics"
    );
    ExitCode::from(1)
}

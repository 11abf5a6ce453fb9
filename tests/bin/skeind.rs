//! `skeind` built as part of this package, so that `cargo test -p skein-tests`
//! always runs the current code (a binary of another package may be stale).

fn main() -> std::process::ExitCode {
    skein_node::cli::main()
}

//! `skeinctl` built as part of this package, so that `cargo test -p skein-tests`
//! always runs the current code.

fn main() -> std::process::ExitCode {
    skein_ctl::main()
}

//! `skeinctl`: see the `skein_ctl` crate documentation.

fn main() -> std::process::ExitCode {
    skein_ctl::main()
}

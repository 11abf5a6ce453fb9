//! `skeind`: one node of a Skein cluster. See `skein_node::cli`.

fn main() -> std::process::ExitCode {
    skein_node::cli::main()
}

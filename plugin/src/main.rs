//! `rdp-preflight`: thin entry point; everything lives in the library.

fn main() -> std::process::ExitCode {
    rdp_preflight::cli::main()
}

//! `lb`: parse the command line, run it, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`lb stats | head`), like other tools.
    // SAFETY: called before any other thread exists.
    let _ = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        )
    };
    let cli = lb::cli::Cli::parse();
    match lb::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

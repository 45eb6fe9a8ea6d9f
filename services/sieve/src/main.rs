//! `sieve`: every service of the pipeline and the operator's tool, in one binary.

use std::process::ExitCode;

use clap::Parser;
use sieve::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    sieve_core::telemetry::init_logs(cli.log_format());
    match cli.run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

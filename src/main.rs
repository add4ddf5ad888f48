//! The `attend` binary: the editor (no subcommand) and the scripting CLI (subcommands).
//! This is the application edge: errors become `anyhow` here and are printed once, with context.

mod cli;

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

//! `kiln`: the command-line front end of the Kiln engine. This file only parses
//! arguments, sets up logging and hands over to the commands.

mod cli;
mod commands;
mod pipeline;
mod render;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // A closed pipe (`kiln list builds | head -1`) ends the process quietly, as it ends
    // every other command-line tool, instead of making the next print panic.
    // SAFETY: called before any thread starts; SIG_DFL is a valid disposition.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args = cli::Cli::parse();
    // `kiln serve` says what it does (lifecycle at info); other commands only warn.
    // RUST_LOG overrides both (e.g. RUST_LOG=kiln_server=debug for every request).
    let default = if matches!(args.command, cli::Command::Serve(_)) {
        "warn,kiln=info,kiln_engine=info,kiln_server=info,kiln_storage=info,kiln_host=info"
    } else {
        // A first compile of a plugin says so: it can take many seconds.
        "warn,kiln_host=info"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

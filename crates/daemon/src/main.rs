//! blockd: a block storage daemon that takes qemu-storage-daemon's command line
//! and speaks its QMP.
//!
//! Start-up processes the command-line options strictly left to right, as QSD
//! does; then the control task ([`control`]) runs commands until `quit` or a
//! signal, and shuts down in QSD's order.

mod chardev;
mod cli;
mod commands;
mod control;
mod daemonize;
mod exports;
mod object;
mod pidfile;
mod startup;

use std::process::ExitCode;

/// The `package` string of the QMP greeting and `query-version`.
pub const PACKAGE: &str = concat!("blockd ", env!("CARGO_PKG_VERSION"));

fn main() -> ExitCode {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let defaulted = args.is_empty();
    if defaulted {
        args = Vec::new();
    }
    let cli = match cli::parse(args) {
        Ok(cli::CliAction::Run(cli)) => cli,
        Ok(cli::CliAction::Help(text) | cli::CliAction::Version(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("blockd: {err}");
            return ExitCode::from(1);
        }
    };
    let cli = if defaulted {
        match cli::default_cli() {
            Ok((cli, _path)) => cli,
            Err(err) => {
                eprintln!("blockd: cannot prepare the default monitor: {err}");
                return ExitCode::from(1);
            }
        }
    } else {
        cli
    };
    let readiness = if cli.daemonize {
        match daemonize::daemonize() {
            Ok(r) => Some(r),
            Err(err) => {
                eprintln!("blockd: --daemonize: {err}");
                return ExitCode::from(1);
            }
        }
    } else {
        None
    };
    // One thread runs every task: the control plane is a single task anyway,
    // and file I/O goes to the blocking pool. Worker threads would only add
    // start-up time, memory and cross-thread wake-ups on the QMP path.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("blockd: cannot start the runtime: {err}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(startup::run(cli, readiness));
    // Worker threads blocked in file I/O must not hold the exit up.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

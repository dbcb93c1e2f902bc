//! tern: a small KVM virtual machine monitor.

mod boot;
mod cli;
mod compat;
mod config;
mod cpu;
mod event_loop;
mod layout;
mod logger;
mod memory;
mod vm;

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use devices::VmExitReason;

/// Parses the command line; usage errors become one line, as every other tern error.
fn parse_cli() -> anyhow::Result<cli::Cli> {
    cli::Cli::try_parse().map_err(|e| {
        use clap::error::ErrorKind;
        if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
            e.exit();
        }
        let text = e.to_string();
        let first = text.lines().next().unwrap_or("invalid arguments");
        anyhow::anyhow!("{} (see tern --help)", first.trim_start_matches("error: "))
    })
}

fn run(start: Instant) -> anyhow::Result<VmExitReason> {
    let cli = parse_cli()?;
    logger::init(&cli.log_level)?;
    let cfg = cli.vm_config()?;
    let vm = vm::Vm::create(&cfg, start)?;
    log::info!("guest PV features offered: {:#x}", vm.pv_features.0);
    Ok(vm.run()?)
}

fn main() -> ExitCode {
    let start = Instant::now();
    match run(start) {
        Ok(reason) => {
            let ms = start.elapsed().as_secs_f64() * 1e3;
            let code = reason.exit_code();
            match &reason {
                VmExitReason::Crash(msg) => eprintln!("tern: error: guest stopped: {msg}"),
                VmExitReason::HostRequest(msg) => eprintln!("tern: {msg}"),
                VmExitReason::Reset => eprintln!("tern: guest reset or powered off"),
                VmExitReason::GuestStatus(s) => eprintln!("tern: guest exited with status {s}"),
            }
            eprintln!("tern: exit code {code} after {ms:.3} ms");
            ExitCode::from(code.clamp(0, 255) as u8)
        }
        Err(e) => {
            // tern's error types carry their causes in their messages.
            eprintln!("tern: error: {e}");
            ExitCode::from(1)
        }
    }
}

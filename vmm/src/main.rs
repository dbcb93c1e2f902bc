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

fn run(start: Instant) -> anyhow::Result<VmExitReason> {
    let cli = cli::Cli::parse();
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
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("tern: error: {}", chain.join(": "));
            ExitCode::from(1)
        }
    }
}

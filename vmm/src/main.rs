//! tern: a small KVM virtual machine monitor.

mod apf;
mod api;
mod balloon;
mod boot;
mod builder;
mod cli;
mod compat;
mod config;
mod cpu;
mod event_loop;
mod layout;
mod lazy;
mod logger;
mod machine;
mod memory;
mod migrate;
mod pagemap;
mod remote;
mod seccomp;
mod serial_socket;
mod testdev;
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

enum Outcome {
    Vm(VmExitReason),
    Remote,
}

fn run(start: Instant) -> anyhow::Result<Outcome> {
    let cli = parse_cli()?;
    if let Some(cli::Command::Remote(r)) = &cli.command {
        remote::run(&r.api_socket, &r.command)?;
        return Ok(Outcome::Remote);
    }
    let args = cli.run;
    logger::init(args.log_level)?;
    let host = args.host_options()?;
    // Filters go on each thread once it is set up (the main thread's when its event loop starts).
    seccomp::init(host.seccomp)?;
    let mut vm = match &args.incoming {
        Some(uri) => {
            let ep: migration::transport::Endpoint = uri.parse()?;
            migrate::flows::receive(&ep, &host, start)?
        }
        None => builder::build_for_boot(&args.vm_config(&host)?, &host, start)?,
    };
    log::info!(
        "guest PV features offered: {:#x}",
        vm.inner.record.pv_features
    );
    let mut subscribers: Vec<event_loop::Subscriber> = Vec::new();
    if let Some(com2) = vm.serial2.take() {
        subscribers.push(std::sync::Arc::new(std::sync::Mutex::new(com2)));
    }
    if let Some(path) = &host.api_socket {
        let mut params = migrate::flows::params(
            args.downtime_ms,
            args.max_iterations,
            args.timeout,
            host.postcopy,
            args.postcopy_after_iterations,
            args.postcopy_preempt == cli::Switch::On,
            args.postcopy_bandwidth,
        );
        params.pacing = args.pacing();
        let server = api::ApiServer::bind(path, vm.inner.clone(), params, start)
            .map_err(|e| anyhow::anyhow!("--api-socket {}: {e}", path.display()))?;
        subscribers.push(std::sync::Arc::new(std::sync::Mutex::new(server)));
    }
    Ok(Outcome::Vm(vm.run(subscribers)?))
}

fn main() -> ExitCode {
    let start = Instant::now();
    match run(start) {
        Ok(Outcome::Remote) => ExitCode::SUCCESS,
        Ok(Outcome::Vm(reason)) => {
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
            // Most of tern's error types already carry their cause in their message: print a
            // cause only when the text so far does not contain it.
            let mut text = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !text.contains(&c) {
                    text = format!("{text}: {c}");
                }
            }
            eprintln!("tern: error: {text}");
            ExitCode::from(1)
        }
    }
}

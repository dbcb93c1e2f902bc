//! `tern-suite`: drives test suites that need more than one tern, or a host-side view.
//!
//! `tern-suite ksm [options]` runs the KSM stress test (see `guest_tests::ksm` and README.md,
//! "KSM"). `tern-suite apf [options]` runs the built-in guest's async page fault suite with lazy
//! memory, writing the pattern file it needs itself. Exit status: 0 PASS, 1 FAIL (or an error
//! while running), 2 bad arguments.

use std::process::ExitCode;

use guest_tests::ksm::plan::{Options, USAGE};
use guest_tests::ksm::{phases, KsmError};

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("tern-suite: error: {msg} ({USAGE})");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ksm") => {}
        Some("apf") => return apf(&args[1..]),
        Some("-h" | "--help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => return usage_error(&format!("unknown suite `{other}` (known: ksm, apf)")),
        None => return usage_error("no suite given"),
    }
    let opts = match Options::parse(&args[1..]) {
        Ok(o) => o,
        Err(e) => return usage_error(&e.to_string()),
    };
    let tern = match guest_tests::tern_binary() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("tern-suite: error: {e}");
            return ExitCode::from(1);
        }
    };
    let report = match phases::run(&opts, &tern) {
        Ok(r) => r,
        Err(KsmError::Plan(e)) => return usage_error(&e.to_string()),
        Err(e) => {
            eprintln!("tern-suite: error: {e}");
            return ExitCode::from(1);
        }
    };
    print!("{}", report.table());
    if let Some(path) = &opts.json {
        let written = serde_json::to_string_pretty(&report)
            .map_err(std::io::Error::other)
            .and_then(|j| std::fs::write(path, j));
        if let Err(e) = written {
            eprintln!("tern-suite: error: writing {}: {e}", path.display());
            return ExitCode::from(1);
        }
    }
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn apf(args: &[String]) -> ExitCode {
    use guest_tests::apf;
    let opts = match apf::Options::parse(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("tern-suite: error: {e} ({})", apf::USAGE);
            return ExitCode::from(2);
        }
    };
    let outcome = guest_tests::tern_binary().and_then(|tern| apf::run(&opts, &tern));
    match outcome {
        Ok(o) => {
            print!("{}", o.stdout);
            if o.passed {
                ExitCode::SUCCESS
            } else {
                eprint!("{}", o.stderr);
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("tern-suite: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

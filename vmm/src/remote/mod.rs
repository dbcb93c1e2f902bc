//! `tern remote`: drives a running tern through its API socket.

mod progress;

use std::path::Path;

use anyhow::{bail, Result};
use serde_json::Value;

use crate::api::{call, Request};
use crate::cli::RemoteCommand;

fn result_of(reply: Value) -> Result<Value> {
    if reply["ok"].as_bool() == Some(true) {
        Ok(reply["result"].clone())
    } else {
        bail!("{}", reply["error"].as_str().unwrap_or("request failed"))
    }
}

/// Runs one remote command and prints its result as JSON. `migrate` waits for the migration to
/// end (unless detached) and fails when it failed.
pub fn run(socket: &Path, cmd: &RemoteCommand) -> Result<()> {
    let request = match cmd {
        RemoteCommand::Status => Request::Status,
        RemoteCommand::Pause => Request::Pause,
        RemoteCommand::Resume { force } => Request::Resume { force: *force },
        RemoteCommand::MigrateStatus => Request::MigrateStatus,
        RemoteCommand::MigrateStartPostcopy => Request::MigrateStartPostcopy,
        RemoteCommand::MigrateCancel => Request::MigrateCancel,
        RemoteCommand::Quit { force } => Request::Quit { force: *force },
        RemoteCommand::Balloon { size } => {
            let Some(bytes) = crate::config::parse_size(size) else {
                bail!("balloon: `{size}` is not a size (e.g. 64M, 1G, 4096)");
            };
            Request::Balloon { bytes }
        }
        RemoteCommand::Migrate {
            uri,
            detach,
            resume,
        } => Request::Migrate {
            uri: uri.clone(),
            detach: *detach,
            resume: *resume,
        },
        RemoteCommand::MigrateRecover { uri } => Request::MigrateRecover { uri: uri.clone() },
    };
    // An attached migrate shows progress on stderr while it waits.
    let progress = matches!(cmd, RemoteCommand::Migrate { detach: false, .. })
        .then(|| progress::Progress::start(socket));
    let reply = call(socket, &request);
    drop(progress);
    let result = result_of(reply?)?;
    println!("{result}");
    Ok(())
}

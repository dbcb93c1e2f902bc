//! `tern remote`: drives a running tern through its API socket.

mod progress;

use std::path::Path;

use anyhow::{bail, Result};
use serde_json::{json, Value};

use crate::api::call;
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
        RemoteCommand::Status => json!({"command": "status"}),
        RemoteCommand::Pause => json!({"command": "pause"}),
        RemoteCommand::Resume { force } => json!({"command": "resume", "force": force}),
        RemoteCommand::MigrateStatus => json!({"command": "migrate-status"}),
        RemoteCommand::MigrateStartPostcopy => json!({"command": "migrate-start-postcopy"}),
        RemoteCommand::MigrateCancel => json!({"command": "migrate-cancel"}),
        RemoteCommand::Quit => json!({"command": "quit"}),
        RemoteCommand::Balloon { size } => {
            let Some(bytes) = crate::config::parse_size(size) else {
                bail!("balloon: `{size}` is not a size (e.g. 64M, 1G, 4096)");
            };
            json!({"command": "balloon", "bytes": bytes})
        }
        RemoteCommand::Migrate {
            uri,
            detach,
            resume,
        } => {
            json!({"command": "migrate", "uri": uri, "detach": detach, "resume": resume})
        }
        RemoteCommand::MigrateRecover { uri } => {
            json!({"command": "migrate-recover", "uri": uri})
        }
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

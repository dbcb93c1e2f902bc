//! The control API's requests: one type for the server (`api.rs`) and `tern remote`
//! (`remote.rs`), in the wire format of docs/api.md: `{"command": "<name>", ...fields}`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Pause,
    Resume {
        /// Even where the guest may run elsewhere (a parked source).
        #[serde(default)]
        force: bool,
    },
    Migrate {
        uri: String,
        /// Reply at once instead of when the migration has ended.
        #[serde(default)]
        detach: bool,
        /// Reconnect a paused postcopy instead of starting a migration.
        #[serde(default)]
        resume: bool,
    },
    MigrateStatus,
    MigrateStartPostcopy,
    MigrateCancel,
    MigrateRecover {
        uri: String,
    },
    Balloon {
        /// The new target size in bytes.
        bytes: u64,
    },
    Quit {
        /// Even where this side holds pages a guest running elsewhere still needs.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        force: bool,
    },
}

/// Every command's name, as on the wire.
pub const COMMANDS: [&str; 10] = [
    "status",
    "pause",
    "resume",
    "migrate",
    "migrate-status",
    "migrate-start-postcopy",
    "migrate-cancel",
    "migrate-recover",
    "balloon",
    "quit",
];

/// Longest request line the API reads (a request is a few hundred bytes; the cap keeps one client
/// from making tern hold memory it never uses).
pub const MAX_REQUEST: usize = 64 << 10;

/// Assembles one request line from what a client sends, in whatever pieces it arrives.
#[derive(Debug, Default)]
pub struct LineReader {
    line: Vec<u8>,
}

impl LineReader {
    /// Takes the next bytes read: the line once its newline came (what follows it is ignored:
    /// one request per connection), None while it is incomplete, an error past [`MAX_REQUEST`]
    /// bytes or when the line is not UTF-8.
    pub fn push(&mut self, got: &[u8]) -> Result<Option<String>, String> {
        let end = got.iter().position(|&b| b == b'\n');
        let take = &got[..end.unwrap_or(got.len())];
        if self.line.len().saturating_add(take.len()) > MAX_REQUEST {
            return Err(format!("request line longer than {MAX_REQUEST} bytes"));
        }
        self.line.extend_from_slice(take);
        if end.is_none() {
            return Ok(None);
        }
        String::from_utf8(std::mem::take(&mut self.line))
            .map(Some)
            .map_err(|_| "the request is not UTF-8".into())
    }

    /// Nothing received yet.
    pub fn is_empty(&self) -> bool {
        self.line.is_empty()
    }
}

/// Why a request line is refused, said the way clients have always read it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("unknown command `{0}`")]
    Unknown(String),
    #[error("{command} needs \"{field}\"")]
    MissingField { command: String, field: String },
    #[error("bad request: {0}")]
    Malformed(String),
}

impl Request {
    /// Parses one request line. serde alone would answer an unknown command with "unknown
    /// variant" and a missing field without the command: name both instead.
    pub fn parse(line: &str) -> Result<Request, RequestError> {
        let err = match serde_json::from_str(line) {
            Ok(req) => return Ok(req),
            Err(e) => e.to_string(),
        };
        #[derive(Deserialize)]
        struct Named {
            command: String,
        }
        let Ok(Named { command }) = serde_json::from_str::<Named>(line) else {
            return Err(RequestError::Malformed(err));
        };
        if !COMMANDS.contains(&command.as_str()) {
            return Err(RequestError::Unknown(command));
        }
        let missing = err
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split_once('`'))
            .map(|(field, _)| field.to_string());
        match missing {
            Some(field) => Err(RequestError::MissingField { command, field }),
            None => Err(RequestError::Malformed(err)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_wire_format_is_docs_api_md() {
        let cases = [
            (Request::Status, json!({"command": "status"})),
            (Request::Pause, json!({"command": "pause"})),
            (
                Request::Resume { force: true },
                json!({"command": "resume", "force": true}),
            ),
            (
                Request::Migrate {
                    uri: "unix:/tmp/m.sock".into(),
                    detach: true,
                    resume: false,
                },
                json!({"command": "migrate", "uri": "unix:/tmp/m.sock", "detach": true, "resume": false}),
            ),
            (Request::MigrateStatus, json!({"command": "migrate-status"})),
            (
                Request::MigrateStartPostcopy,
                json!({"command": "migrate-start-postcopy"}),
            ),
            (Request::MigrateCancel, json!({"command": "migrate-cancel"})),
            (
                Request::MigrateRecover {
                    uri: "tcp:127.0.0.1:4444".into(),
                },
                json!({"command": "migrate-recover", "uri": "tcp:127.0.0.1:4444"}),
            ),
            (
                Request::Balloon { bytes: 1 << 26 },
                json!({"command": "balloon", "bytes": 67108864}),
            ),
            (Request::Quit { force: false }, json!({"command": "quit"})),
        ];
        assert_eq!(cases.len(), COMMANDS.len());
        for ((req, wire), name) in cases.iter().zip(COMMANDS) {
            assert_eq!(&serde_json::to_value(req).unwrap(), wire);
            assert_eq!(wire["command"], name);
            assert_eq!(&Request::parse(&wire.to_string()).unwrap(), req);
        }
    }

    #[test]
    fn optional_fields_default_and_extra_fields_are_ignored() {
        assert_eq!(
            Request::parse(r#"{"command":"resume"}"#),
            Ok(Request::Resume { force: false })
        );
        assert_eq!(
            Request::parse(r#"{"command":"migrate","uri":"file:/tmp/s"}"#),
            Ok(Request::Migrate {
                uri: "file:/tmp/s".into(),
                detach: false,
                resume: false
            })
        );
        assert_eq!(
            Request::parse(r#"{"command":"status","uri":"unix:/x","bytes":1}"#),
            Ok(Request::Status)
        );
    }

    #[test]
    fn refusals_name_the_command() {
        let err = |line: &str| Request::parse(line).unwrap_err().to_string();
        assert_eq!(err(r#"{"command":"reboot"}"#), "unknown command `reboot`");
        assert_eq!(err(r#"{"command":"migrate"}"#), r#"migrate needs "uri""#);
        assert_eq!(
            err(r#"{"command":"migrate-recover","detach":true}"#),
            r#"migrate-recover needs "uri""#
        );
        assert_eq!(err(r#"{"command":"balloon"}"#), r#"balloon needs "bytes""#);
        assert!(err(r#"{"command":"balloon","bytes":"64M"}"#).starts_with("bad request: "));
        assert!(err(r#"{"uri":"unix:/x"}"#).contains("missing field `command`"));
        assert!(err("not json").starts_with("bad request: "));
    }
}

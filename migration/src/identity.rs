//! A migration's identity: 128 random bits the source picks when a migration starts. It travels
//! in the stream header of the main connection and of every extra one (RAM channels, the preempt
//! channel, a postcopy recovery's reconnection), so the destination can refuse a connection that
//! belongs to another migration instead of mixing its pages in.

use std::fmt;
use std::io;

use serde::{Serialize, Serializer};

/// The id's length in the stream header.
pub const ID_LEN: usize = 16;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MigrationId(pub [u8; ID_LEN]);

impl MigrationId {
    /// A fresh id from the kernel's random pool (never a counter: two processes must not agree
    /// by accident).
    pub fn random() -> io::Result<MigrationId> {
        let mut id = [0u8; ID_LEN];
        let mut filled = 0;
        while filled < ID_LEN {
            // SAFETY: the kernel writes at most `ID_LEN - filled` bytes into the live buffer
            // from offset `filled`, which lies inside it.
            let n =
                unsafe { libc::getrandom(id[filled..].as_mut_ptr().cast(), ID_LEN - filled, 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            filled += n as usize;
        }
        Ok(MigrationId(id))
    }

    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Debug for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MigrationId({})", self.hex())
    }
}

/// `migrate-status` shows it as 32 hex digits.
impl Serialize for MigrationId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.hex())
    }
}

/// Refuses a connection of migration `got` where migration `expected` is in progress: tells
/// that peer why (an Abort section, when the connection can be written) and logs it. The
/// migration in progress is not touched.
pub(crate) fn refuse_foreign(
    writer: Option<Box<dyn std::io::Write + Send>>,
    what: &str,
    expected: MigrationId,
    got: MigrationId,
) {
    let e = crate::stream::StreamError::ForeignMigration { expected, got };
    refuse_peer(writer, what, &e);
}

/// Refuses the peer of a connection this side will not take, `why`: logged, and told in an
/// Abort section when the connection can be written.
pub(crate) fn refuse_peer<W: std::io::Write>(
    writer: Option<W>,
    what: &str,
    why: &dyn std::fmt::Display,
) {
    log::warn!("{what} refused: {why}");
    if let Some(w) = writer {
        let mut w = crate::stream::StreamWriter::new(w);
        let told = w
            .record(crate::stream::Section::Abort, &why.to_string())
            .and_then(|_| w.flush());
        if let Err(te) = told {
            log::debug!("cannot tell the refused {what} why: {te}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ids_differ_and_print_as_hex() {
        let a = MigrationId::random().unwrap();
        let b = MigrationId::random().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.hex().len(), 32);
        assert!(a.hex().chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(
            serde_json::to_value(MigrationId([0xab; 16])).unwrap(),
            "ab".repeat(16)
        );
    }
}

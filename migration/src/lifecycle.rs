//! One state machine for a migration, per side: where this side stands ([`Stage`], read off the
//! published [`MigrationStatus`]) and, for every control command, whether it is accepted there
//! ([`admit`]). The API asks before it acts, under the status lock where the command changes the
//! state, so two commands never both pass. docs/api.md has the same table.
//!
//! The rule the table keeps: once the guest may run on the other side (`postmigrate`, a postcopy
//! in flight or paused, a completed source), nothing but an explicit `resume --force` on a source
//! lets this side run it again, and no command starts anything that reads this side's copy as if
//! it were the guest.

use crate::progress::{MigrationState, MigrationStatus, Phase, Role, StatusCell};

/// A control command, as the API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `migrate URI` (a snapshot is `migrate file:PATH`).
    Migrate,
    /// `migrate URI --resume`: reconnect a paused postcopy (source).
    MigrateResume,
    /// `migrate-recover URI`: listen for the source's reconnection (destination).
    MigrateRecover,
    MigrateCancel,
    MigrateStartPostcopy,
    Pause,
    Resume,
    /// `resume --force`: a parked source runs its copy again, on the user's word that the
    /// destination never ran it.
    ResumeForce,
    Balloon,
    Quit,
    /// `quit --force`: quit even where this side holds pages a running guest needs.
    QuitForce,
}

impl Command {
    pub const ALL: [Command; 11] = [
        Command::Migrate,
        Command::MigrateResume,
        Command::MigrateRecover,
        Command::MigrateCancel,
        Command::MigrateStartPostcopy,
        Command::Pause,
        Command::Resume,
        Command::ResumeForce,
        Command::Balloon,
        Command::Quit,
        Command::QuitForce,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Migrate => "migrate",
            Command::MigrateResume => "migrate --resume",
            Command::MigrateRecover => "migrate-recover",
            Command::MigrateCancel => "migrate-cancel",
            Command::MigrateStartPostcopy => "migrate-start-postcopy",
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::ResumeForce => "resume --force",
            Command::Balloon => "balloon",
            Command::Quit => "quit",
            Command::QuitForce => "quit --force",
        }
    }
}

/// Where this side of a migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// This side owns the guest and no migration runs: none yet, one that failed or was
    /// cancelled before the switch, or a completed incoming one (a restore too, even while it
    /// still places pages lazily: a migration reads those through the fault thread).
    Owner,
    /// Source, precopy: the guest runs here and is being copied.
    Migrating,
    /// Source: the switch has begun (the last pass, or postcopy: the destination runs the guest
    /// and this side serves its missing pages).
    Switching,
    /// Destination, before the switch: receiving, the guest does not run yet.
    Incoming,
    /// Destination after a postcopy switch: the guest runs here, pages still arriving.
    PostcopyActive,
    /// Source: the switch was sent, the destination's confirmation never came.
    Postmigrate,
    /// A postcopy broke after the switch; both sides pause, the source holds missing pages.
    PostcopyPaused(Role),
    /// Recovering a paused postcopy.
    PostcopyRecover(Role),
    /// Source: the destination confirmed it runs the guest.
    Migrated,
}

impl Stage {
    pub fn of(s: &MigrationStatus) -> Stage {
        match (s.state, s.role) {
            (MigrationState::Active, Role::Destination) => match s.phase {
                Phase::Running => Stage::PostcopyActive,
                _ => Stage::Incoming,
            },
            (MigrationState::Active, _) => {
                if s.switching || s.phase == Phase::Postcopy {
                    Stage::Switching
                } else {
                    Stage::Migrating
                }
            }
            (MigrationState::Completed, Role::Source) => Stage::Migrated,
            (MigrationState::Postmigrate, _) => Stage::Postmigrate,
            (MigrationState::PostcopyPaused, r) => Stage::PostcopyPaused(r),
            (MigrationState::PostcopyRecover, r) => Stage::PostcopyRecover(r),
            _ => Stage::Owner,
        }
    }

    /// As `migrate-status` spells it (`stage`).
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Owner => "running-here",
            Stage::Migrating => "migrating",
            Stage::Switching => "switching",
            Stage::Incoming => "incoming",
            Stage::PostcopyActive => "postcopy-active",
            Stage::Postmigrate => "postmigrate",
            Stage::PostcopyPaused(_) => "postcopy-paused",
            Stage::PostcopyRecover(_) => "postcopy-recover",
            Stage::Migrated => "migrated",
        }
    }

    /// This side may hold pages that a guest running elsewhere still needs.
    fn serves_pages(self) -> bool {
        matches!(
            self,
            Stage::Switching
                | Stage::PostcopyPaused(Role::Source)
                | Stage::PostcopyRecover(Role::Source)
        )
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stage::PostcopyPaused(r) | Stage::PostcopyRecover(r) if *r != Role::None => {
                write!(f, "{} ({r})", self.as_str())
            }
            _ => f.write_str(self.as_str()),
        }
    }
}

/// A command refused in a stage, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} refused in state {stage}: {why}", command.as_str())]
pub struct Refused {
    pub command: Command,
    pub stage: Stage,
    pub why: &'static str,
}

const ELSEWHERE: &str = "the guest may be running on the destination; only `resume --force` (if \
you know it never ran there) or `quit` apply here";

/// Whether `command` is accepted in the stage `status` shows.
pub fn admit(status: &MigrationStatus, command: Command) -> Result<(), Refused> {
    let stage = Stage::of(status);
    let refuse = |why| {
        Err(Refused {
            command,
            stage,
            why,
        })
    };
    use Command as C;
    use Stage as S;
    match (command, stage) {
        (C::Pause, S::Migrating | S::Switching | S::Incoming | S::PostcopyActive) => {
            refuse("a migration is in progress")
        }
        (C::Pause, _) => Ok(()),
        (C::QuitForce, _) => Ok(()),
        (C::Quit, s) if s.serves_pages() => refuse(
            "this side holds pages the guest running on the destination still needs; quitting \
would lose the guest (`quit --force` to do it anyway)",
        ),
        (C::Quit, _) => Ok(()),
        (C::Migrate, S::Owner) => Ok(()),
        (C::Migrate, S::Migrating | S::Switching) => refuse("a migration is already in progress"),
        (C::Migrate, S::Incoming | S::PostcopyActive) => {
            refuse("pages are still arriving here; migrate again once this migration completed")
        }
        (C::Migrate, S::PostcopyPaused(_) | S::PostcopyRecover(_)) => refuse(
            "a postcopy is paused with pages missing on the destination; recover it \
(`migrate-recover` there, `migrate --resume` on the source)",
        ),
        (C::Migrate, S::Postmigrate | S::Migrated) => refuse(ELSEWHERE),
        (C::MigrateResume, S::PostcopyPaused(Role::Source)) => Ok(()),
        (C::MigrateResume, _) => {
            refuse("nothing to resume: `migrate --resume` needs a source in postcopy-paused")
        }
        (C::MigrateRecover, S::PostcopyPaused(Role::Destination)) => Ok(()),
        (C::MigrateRecover, _) => refuse(
            "nothing to recover here: migrate-recover needs a destination in postcopy-paused",
        ),
        (C::MigrateCancel, S::Migrating) => Ok(()),
        (C::MigrateCancel, S::Switching) => refuse(
            "the switch has begun, the guest is moving to (or already runs on) the destination; \
cancelling now could lose it",
        ),
        (C::MigrateCancel, _) => refuse("no outgoing migration is running"),
        (C::MigrateStartPostcopy, S::Migrating) => Ok(()),
        (C::MigrateStartPostcopy, _) => refuse("no precopy is running on this side"),
        (C::Resume, S::Owner) => Ok(()),
        (C::ResumeForce, S::Owner) => Ok(()),
        (C::ResumeForce, S::Postmigrate | S::PostcopyPaused(Role::Source)) => Ok(()),
        (C::Resume | C::ResumeForce, S::Migrating | S::Switching | S::Incoming) => {
            refuse("a migration is in progress")
        }
        (C::Resume | C::ResumeForce, S::PostcopyActive) => {
            refuse("the guest runs here while its pages arrive")
        }
        (C::Resume, S::Postmigrate | S::PostcopyPaused(Role::Source) | S::Migrated) => {
            refuse(ELSEWHERE)
        }
        (C::ResumeForce, S::Migrated) => {
            refuse("the destination confirmed it runs the guest; this copy is stale")
        }
        (C::Resume | C::ResumeForce, S::PostcopyPaused(_) | S::PostcopyRecover(_)) => {
            refuse("pages are missing here and the source holds them; recover the postcopy first")
        }
        (C::Balloon, S::Owner | S::Migrating | S::PostcopyActive) => Ok(()),
        (C::Balloon, S::PostcopyPaused(Role::Destination)) => Ok(()),
        (C::Balloon, _) => refuse("the guest is not running on this side"),
    }
}

/// Admits `command` and, when accepted, applies `then` to the status under the same lock, so
/// that no other command slips in between the verdict and what it starts.
pub fn admit_then(
    cell: &StatusCell,
    command: Command,
    then: impl FnOnce(&mut MigrationStatus),
) -> Result<(), Refused> {
    let mut verdict = Ok(());
    cell.update(|s| {
        verdict = admit(s, command);
        if verdict.is_ok() {
            then(s);
        }
    });
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: MigrationState, role: Role, phase: Phase, switching: bool) -> MigrationStatus {
        MigrationStatus {
            state,
            role,
            phase,
            switching,
            ..Default::default()
        }
    }

    #[test]
    fn stages_read_off_the_status() {
        use MigrationState as M;
        let cases = [
            (
                status(M::None, Role::None, Phase::None, false),
                Stage::Owner,
            ),
            (
                status(M::Failed, Role::Source, Phase::None, false),
                Stage::Owner,
            ),
            (
                status(M::Completed, Role::Destination, Phase::End, false),
                Stage::Owner,
            ),
            (
                status(M::Active, Role::Source, Phase::Precopy, false),
                Stage::Migrating,
            ),
            (
                status(M::Active, Role::Source, Phase::Precopy, true),
                Stage::Switching,
            ),
            (
                status(M::Active, Role::Source, Phase::Postcopy, false),
                Stage::Switching,
            ),
            (
                status(M::Active, Role::Destination, Phase::Listen, false),
                Stage::Incoming,
            ),
            (
                status(M::Active, Role::Destination, Phase::Running, false),
                Stage::PostcopyActive,
            ),
            (
                status(M::Completed, Role::Source, Phase::None, false),
                Stage::Migrated,
            ),
        ];
        for (s, want) in cases {
            assert_eq!(Stage::of(&s), want, "{s:?}");
        }
    }

    /// Every stage x command: `+` accepted, `-` refused. Columns in [`Command::ALL`]'s order:
    /// migrate, --resume, recover, cancel, start-postcopy, pause, resume, resume --force,
    /// balloon, quit, quit --force.
    #[test]
    fn the_table() {
        use MigrationState as M;
        let rows: [(MigrationStatus, &str); 12] = [
            (
                status(M::None, Role::None, Phase::None, false),
                "+----++++++",
            ),
            (
                status(M::Cancelled, Role::Source, Phase::None, false),
                "+----++++++",
            ),
            (
                status(M::Active, Role::Source, Phase::Precopy, false),
                "---++---+++",
            ),
            (
                status(M::Active, Role::Source, Phase::Postcopy, false),
                "----------+",
            ),
            (
                status(M::Active, Role::Destination, Phase::Listen, false),
                "---------++",
            ),
            (
                status(M::Active, Role::Destination, Phase::Running, false),
                "--------+++",
            ),
            (
                status(M::Postmigrate, Role::Source, Phase::None, false),
                "-----+-+-++",
            ),
            (
                status(M::PostcopyPaused, Role::Source, Phase::None, false),
                "-+---+-+--+",
            ),
            (
                status(M::PostcopyPaused, Role::Destination, Phase::None, false),
                "--+--+--+++",
            ),
            (
                status(M::PostcopyRecover, Role::Source, Phase::None, false),
                "-----+----+",
            ),
            (
                status(M::PostcopyRecover, Role::Destination, Phase::None, false),
                "-----+---++",
            ),
            (
                status(M::Completed, Role::Source, Phase::None, false),
                "-----+---++",
            ),
        ];
        for (s, want) in rows {
            let want: Vec<bool> = want.chars().map(|c| c == '+').collect();
            for (c, w) in Command::ALL.iter().zip(want) {
                assert_eq!(
                    admit(&s, *c).is_ok(),
                    w,
                    "{} in {}",
                    c.as_str(),
                    Stage::of(&s)
                );
            }
        }
    }

    #[test]
    fn no_command_lets_a_parked_side_run_its_copy() {
        use MigrationState as M;
        for (state, role) in [
            (M::Postmigrate, Role::Source),
            (M::PostcopyPaused, Role::Source),
            (M::PostcopyPaused, Role::Destination),
            (M::PostcopyRecover, Role::Source),
            (M::PostcopyRecover, Role::Destination),
            (M::Completed, Role::Source),
        ] {
            let s = status(state, role, Phase::None, false);
            for c in [Command::Migrate, Command::Resume] {
                let e = admit(&s, c).expect_err("refused");
                // The refusal names the stage, the completed source's ("migrated") too.
                let stage = Stage::of(&s).as_str();
                assert!(e.to_string().contains(stage), "{e}");
            }
        }
    }
}

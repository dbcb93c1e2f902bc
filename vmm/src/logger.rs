//! A minimal stderr logger for the `log` facade.

use log::{LevelFilter, Log, Metadata, Record};

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }
    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            eprintln!(
                "tern: {}: {}",
                record.level().as_str().to_lowercase(),
                record.args()
            );
        }
    }
    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

pub fn init(level: &str) -> anyhow::Result<()> {
    let filter: LevelFilter = level.parse().map_err(|_| {
        anyhow::anyhow!("--log-level: `{level}` is not one of error, warn, info, debug")
    })?;
    log::set_logger(&LOGGER).map_err(|e| anyhow::anyhow!("logger: {e}"))?;
    log::set_max_level(filter);
    Ok(())
}

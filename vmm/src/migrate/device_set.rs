//! The VM's devices that have migration state, as one list of named records: each device saves
//! and restores its own record (`devices::Stateful`); nothing here knows what is inside.

use std::sync::{Arc, Mutex};

use devices::Stateful;
use migration::state::{DeviceRecord, DeviceStates};
use migration::{VmResult, VmSideError};

/// A device with migration state, as the VM holds it (behind its bus lock).
pub trait StatefulDevice: Send + Sync {
    fn save(&self) -> VmResult<serde_json::Value>;
    fn restore(&self, state: &serde_json::Value) -> VmResult<()>;
}

impl<D: Stateful + Send> StatefulDevice for Mutex<D> {
    fn save(&self) -> VmResult<serde_json::Value> {
        let state = devices::bus::lock(self).save();
        serde_json::to_value(state).map_err(|e| VmSideError(e.to_string()))
    }

    fn restore(&self, state: &serde_json::Value) -> VmResult<()> {
        let state: D::State =
            serde_json::from_value(state.clone()).map_err(|e| VmSideError(e.to_string()))?;
        devices::bus::lock(self)
            .restore(&state)
            .map_err(|e| VmSideError(e.to_string()))
    }
}

/// The VM's stateful devices by name, in a fixed order.
#[derive(Default)]
pub struct DeviceSet(Vec<(String, Arc<dyn StatefulDevice>)>);

impl DeviceSet {
    pub fn add(&mut self, name: &str, device: Arc<dyn StatefulDevice>) {
        self.0.push((name.to_string(), device));
    }

    pub fn save(&self) -> VmResult<DeviceStates> {
        let mut records = Vec::new();
        for (name, device) in &self.0 {
            let state = device
                .save()
                .map_err(|e| VmSideError(format!("saving device `{name}`: {e}")))?;
            records.push(DeviceRecord {
                name: name.clone(),
                state,
            });
        }
        Ok(DeviceStates { records })
    }

    /// Refuses device state that does not match this VM's devices: a record for a device it
    /// does not have, two for one device, or none for one it has. Runs before anything is
    /// restored, so no record is ever kept unapplied.
    pub fn check(&self, states: &DeviceStates) -> VmResult<()> {
        for (i, r) in states.records.iter().enumerate() {
            if !self.0.iter().any(|(name, _)| *name == r.name) {
                return Err(VmSideError(format!(
                    "the stream has state for an unknown device `{}`",
                    r.name
                )));
            }
            if states.records[..i].iter().any(|o| o.name == r.name) {
                return Err(VmSideError(format!(
                    "the stream has two states for device `{}`",
                    r.name
                )));
            }
        }
        if let Some((name, _)) = self.0.iter().find(|(name, _)| states.get(name).is_none()) {
            return Err(VmSideError(format!(
                "the stream has no state for device `{name}`"
            )));
        }
        Ok(())
    }

    /// Restores each device from its record (after `check`).
    pub fn restore(&self, states: &DeviceStates) -> VmResult<()> {
        self.check(states)?;
        for (name, device) in &self.0 {
            if let Some(state) = states.get(name) {
                device
                    .restore(state)
                    .map_err(|e| VmSideError(format!("restoring device `{name}`: {e}")))?;
            }
        }
        Ok(())
    }
}

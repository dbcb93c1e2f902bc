//! The destination's receive path: `read_start`, then `receive` (reader thread + apply) into a
//! fake VM, and the postcopy tail when the stream switches to postcopy.

use std::io::{Cursor, Read};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use migration::incoming::{self, Options, Received, ReturnPath};
use migration::progress::StatusCell;
use migration::stream::{StreamReader, StreamWriter};

use crate::bytes::{sections, stream, Bytes};
use crate::fake_vm::{FakeVm, LAYOUT};

/// Input: an options byte (bit 0 `--postcopy`, bit 1 local, bit 2 shared RAM), then sections
/// for [`sections`]; the stream is their framing.
pub fn run(data: &[u8]) {
    let mut b = Bytes::new(data);
    let flags = b.u8();
    let options = Options {
        postcopy: flags & 1 != 0,
        vcpu_tids: Vec::new(),
        local: flags & 2 != 0,
        shared_ram: flags & 4 != 0,
        preempt: Mutex::new(None),
        id: Default::default(),
    };
    let _ = receive(stream(&sections(b.rest())), &options);
}

/// Receives `bytes` as a destination would, to the end (errors are fine, panics are not): how
/// it ended, for the tests of the seeds.
pub fn receive(bytes: Vec<u8>, options: &Options) -> Result<&'static str, String> {
    crate::postcopy::quick_peer_timeout();
    let mut r = StreamReader::new(Box::new(Cursor::new(bytes)) as Box<dyn Read + Send>);
    // The configuration is read and checked; the VM is the fixed fake layout (building VMs of
    // any size is the VMM's business, checked there against the command line's limits).
    incoming::read_start(&mut r).map_err(|e| e.to_string())?;
    let vm = FakeVm::new(&LAYOUT);
    let status = StatusCell::default();
    let rp: ReturnPath = Arc::new(Mutex::new(StreamWriter::new(Box::new(std::io::sink()))));
    let received = incoming::receive(r, &vm, &status, Instant::now(), Some(rp), options);
    match received.map_err(|e| e.to_string())? {
        Received::Precopy { .. } => Ok("precopy"),
        Received::Postcopy { tail, .. } => {
            let ran = tail.run(&status).map_err(|e| e.to_string());
            tail.into_listener().finish();
            ran.map(|_| "postcopy")
        }
    }
}

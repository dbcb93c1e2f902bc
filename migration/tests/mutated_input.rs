//! Mutated migration streams and snapshot files: thousands of seeded mutations of valid input (bit
//! flips, overwritten length fields, cuts, inserted junk) must each end in a clean result or a
//! clear error: no panic, no hang, no allocation beyond the section limits. A stable-toolchain
//! stand-in for coverage-guided fuzzing (the seed makes any failure reproducible).

mod common;

use std::io::Cursor;

use common::{FakeVm, TempDir, LAYOUT};
use migration::progress::StatusCell;
use migration::snapshot::{self, Snapshot};
use migration::stream::{parse_ram, RamBatch, Section, StreamReader, StreamWriter};
use migration::MigratableVm;

/// xorshift64*: small, seeded, good enough to pick positions and values.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One mutation of `good`: a few of flips, overwritten u32s (lengths), a cut, inserted bytes.
fn mutate(good: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = good.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(4) {
            0 => {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
            1 if b.len() > 4 => {
                let i = rng.below(b.len() - 4);
                let v = match rng.below(3) {
                    0 => u32::MAX,
                    1 => rng.next() as u32,
                    _ => (rng.next() % 64) as u32,
                };
                b[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
            2 => b.truncate(rng.below(b.len())),
            _ => {
                let i = rng.below(b.len());
                let junk: Vec<u8> = (0..1 + rng.below(16)).map(|_| rng.next() as u8).collect();
                b.splice(i..i, junk);
            }
        }
        if b.is_empty() {
            break;
        }
    }
    b
}

/// A valid stream: header, configuration, RAM batches (full and zero pages), end.
fn valid_stream(vm: &FakeVm) -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new());
    w.header(Default::default()).unwrap();
    w.record(Section::Config, &vm.config()).unwrap();
    let mut batch = RamBatch::default();
    let mut page = vec![0u8; 4096];
    for (i, r) in vm.ram_regions().iter().enumerate() {
        for p in 0..8u64 {
            let gpa = r.gpa + p * 4096;
            if (p + i as u64).is_multiple_of(3) {
                batch.push_zero(gpa);
            } else {
                vm.read_ram(gpa, &mut page).unwrap();
                batch.push_full(gpa, &page);
            }
        }
    }
    w.section(Section::Ram, batch.payload()).unwrap();
    w.record(Section::IterationDone, &1u32).unwrap();
    w.record(Section::End, &migration::state::EndRecord::default())
        .unwrap();
    w.get_mut().clone()
}

#[test]
fn mutated_streams_end_cleanly() {
    let vm = FakeVm::new(&LAYOUT);
    for p in 0..vm.total_pages() {
        vm.guest_write(p, false);
    }
    let good = valid_stream(&vm);
    let mut rng = Rng(0x7465_726e_5f66_757a);
    let (mut refused, mut whole) = (0, 0);
    for _ in 0..20_000 {
        let bad = mutate(&good, &mut rng);
        let mut r = StreamReader::new(Cursor::new(bad));
        let mut ok = r.header().is_ok();
        // Every section either reads (checksum, size limit) or errors; RAM payloads parse or
        // error page by page. The stream is finite, so this loop ends.
        while ok {
            match r.read_section() {
                Ok(f) => {
                    if f.kind == Section::Ram {
                        for rec in parse_ram(&f.payload) {
                            if rec.is_err() {
                                ok = false;
                                break;
                            }
                        }
                    }
                    if f.kind == Section::End {
                        break;
                    }
                }
                Err(_) => ok = false,
            }
        }
        if ok {
            whole += 1;
        } else {
            refused += 1;
        }
    }
    // The checksums catch almost every mutation; some (a cut after the end) still read whole.
    assert!(
        refused > 19_000,
        "only {refused} refused, {whole} read whole"
    );
}

#[test]
fn mutated_snapshots_are_refused_or_read_with_checked_pages() {
    let dir = TempDir::new("mutated-snap");
    let vm = FakeVm::new(&LAYOUT);
    for p in (0..vm.total_pages()).step_by(3) {
        vm.guest_write(p, false);
    }
    let path = dir.0.join("good.snap");
    snapshot::write(&vm, &path, &StatusCell::default()).unwrap();
    let good = std::fs::read(&path).unwrap();
    let bad_path = dir.0.join("bad.snap");
    let mut rng = Rng(0x736e_6170_7368_6f74);
    let mut page = vec![0u8; 4096];
    let (mut refused, mut bad_pages) = (0, 0);
    for _ in 0..2_000 {
        std::fs::write(&bad_path, mutate(&good, &mut rng)).unwrap();
        match Snapshot::open(&bad_path) {
            Err(_) => refused += 1,
            // Opened: every page must read back checked (a corrupted one is an error, never
            // garbage).
            Ok(s) => {
                let stored: Vec<u64> = s.stored().collect();
                for gpa in stored {
                    if s.read_page(gpa, &mut page).is_err() {
                        bad_pages += 1;
                    }
                }
            }
        }
    }
    assert!(
        refused > 0 && refused + bad_pages > 1_000,
        "{refused} refused, {bad_pages} bad pages"
    );
}

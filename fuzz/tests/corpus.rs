//! Every corpus file (seeds, and what fuzzing found) through its target, in the ordinary test
//! run: a fixed crash stays fixed. The seeds must also still reach what they were made for.

use std::path::PathBuf;

use tern_fuzz::{balloon, incoming, postcopy, seeds, snapshot, TARGETS};

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

fn replay(target: &str) {
    let (_, run) = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .expect("a known target");
    let mut files: Vec<_> = std::fs::read_dir(corpus_dir(target))
        .unwrap_or_else(|e| panic!("corpus/{target}: {e}"))
        .map(|e| e.expect("a corpus entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "corpus/{target} is empty");
    for f in &files {
        let input = std::fs::read(f).expect("a corpus file");
        eprintln!("{target}: {}", f.display());
        run(&input);
    }
    for (_, _, input) in seeds::all().iter().filter(|(t, _, _)| *t == target) {
        run(input);
    }
}

macro_rules! replay_tests {
    ($($name:ident),*) => {$(
        #[test]
        fn $name() {
            replay(stringify!($name));
        }
    )*};
}

replay_tests!(stream, incoming, postcopy, snapshot, balloon, decoder, api);

#[test]
fn every_target_has_a_replay_test() {
    let names: Vec<_> = TARGETS.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        ["stream", "incoming", "postcopy", "snapshot", "balloon", "decoder", "api"]
    );
}

fn seed(target: &str, name: &str) -> Vec<u8> {
    seeds::all()
        .into_iter()
        .find(|(t, n, _)| *t == target && *n == name)
        .map(|(_, _, s)| s)
        .expect("a seed")
}

#[test]
fn the_migration_seeds_are_received_whole() {
    use migration::incoming::Options;
    use std::sync::Mutex;
    let options = |postcopy| Options {
        postcopy,
        vcpu_tids: Vec::new(),
        local: false,
        shared_ram: false,
        preempt: Mutex::new(None),
        id: Default::default(),
    };
    let frames = |s: &[u8]| tern_fuzz::bytes::stream(&tern_fuzz::bytes::sections(&s[1..]));
    let pre = seed("incoming", "precopy");
    assert_eq!(
        incoming::receive(frames(&pre), &options(false)),
        Ok("precopy")
    );
    let post = seed("incoming", "postcopy");
    assert_eq!(
        incoming::receive(frames(&post), &options(true)),
        Ok("postcopy")
    );
    // Without --postcopy the same stream is refused at ADVISE.
    let refused = incoming::receive(frames(&post), &options(false)).unwrap_err();
    assert!(refused.contains("--postcopy"), "{refused}");
    assert_eq!(
        postcopy::receive(&seed("postcopy", "complete")),
        Ok("postcopy")
    );
}

/// `cargo test -p tern-fuzz -- --ignored write_seeds` rewrites corpus/*/seed-*.
#[test]
#[ignore]
fn write_seeds() {
    for (target, name, input) in seeds::all() {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}")), input).unwrap();
    }
}

#[test]
fn the_snapshot_seed_opens_with_its_pages() {
    let mut input = seed("snapshot", "three-pages");
    assert_eq!(snapshot::open(&input), Ok(3));
    // A stored page changed after its checksum was taken reads as an error, not garbage.
    input[2] ^= 0xff;
    assert_eq!(snapshot::open(&input), Ok(2));
}

#[test]
fn the_balloon_seed_inflates_and_deflates() {
    // 4 of the 5 PFNs are RAM (1-3 and 10): discarded once each; both queues used once.
    assert_eq!(
        balloon::drive(&seed("balloon", "inflate-deflate")),
        (4, [1, 1])
    );
}

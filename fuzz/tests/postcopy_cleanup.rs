//! A destination whose postcopy fails after DISCARD (here: RUN without the device state) drops
//! its listener inside `receive`: the fault thread must stop with it. It once ran on, polling its
//! userfaultfd, for the life of the process: one thread and one descriptor per failed attempt
//! (what fuzzing the postcopy target piles up by the thousand). Its own test binary, so no other
//! test's threads are counted.

/// Threads of this process named `name`.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}

#[test]
fn a_failed_postcopy_leaves_no_fault_thread() {
    // Flags 2: no state sections before RUN; one discard run of 4 pages at page 3.
    let input = [2u8, 1, 3, 0, 4, 0];
    for _ in 0..5 {
        let err = tern_fuzz::postcopy::receive(&input).unwrap_err();
        assert!(err.contains("without the"), "{err}");
    }
    assert_eq!(threads_named("postcopy-faults"), 0);
}

//! A tiny scheduler for CPL3 tasks on one CPU, driven by async page faults: a task that takes a
//! PAGE_NOT_PRESENT parks on its token and another runs; a PAGE_READY wakes the task parked on
//! its token. Sleepers are the 2010 seed's table keyed by token: a READY that comes before its
//! NOT_PRESENT leaves a "ready first" entry the NOT_PRESENT consumes (the task just continues),
//! and the token ~0 wakes every sleeper.
//!
//! Tasks are never preempted by anything else (no timer). All scheduling runs at CPL3 with
//! IF = 0: in the upcall (`rt::apf`), in a task that has finished, and in `run`'s first
//! dispatch; tasks run with IF = 1. So the state below is only ever touched by one of them at a
//! time, and events that come meanwhile wait in the LAPIC or the event queue.
//!
//! Order after an event: tasks woken by it, then the interrupted task, then the others.

use core::ptr::addr_of_mut;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::rt::apf::{self, Context, Event, Frame, Fx};
use crate::rt::{cpu, user};

pub const MAX_TASKS: usize = 3;
const SLOTS: usize = 16;
const RFLAGS_IF: u64 = 0x200;

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Runnable,
    Running,
    Parked,
    Done,
}

#[derive(Clone, Copy)]
struct Task {
    ctx: Context,
    state: State,
    /// `run` returns when every essential task is done.
    essential: bool,
    /// The compute counter when the task parked.
    parked_compute: u64,
}

/// The seed's sleeper table.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    Empty,
    Sleeper { token: u32, task: usize },
    ReadyFirst { token: u32 },
}

#[derive(Clone, Copy, Default)]
pub struct Stats {
    /// PAGE_NOT_PRESENT events.
    pub faults: u64,
    /// Tasks parked on a token.
    pub parked: u64,
    /// PAGE_READY events (all of them, wake-alls and spurious ones included).
    pub readies: u64,
    /// Readies that found a sleeper, or a NOT_PRESENT that found its ready first, plus the
    /// tasks a wake-all woke.
    pub matched: u64,
    /// NOT_PRESENTs whose READY had come first.
    pub ready_first: u64,
    pub wake_alls: u64,
    pub woken_by_all: u64,
    /// Readies with token 0 (no such token exists).
    pub spurious: u64,
    /// "Ready first" entries a wake-all dropped.
    pub stale: u64,
    /// Times the CPU halted with nothing to run.
    pub idle_waits: u64,
    /// Compute progress while the watched task was parked.
    pub compute_during_waits: u64,
}

struct Sched {
    tasks: [Task; MAX_TASKS],
    ntasks: usize,
    current: Option<usize>,
    runq: [usize; MAX_TASKS],
    rq_len: usize,
    slots: [Slot; SLOTS],
    main: Context,
    stats: Stats,
    compute: Option<&'static AtomicU64>,
    watch: usize,
    on_fault: Option<fn(u32, bool)>,
}

static mut SCHED: Sched = Sched {
    tasks: [Task {
        ctx: Context::ZERO,
        state: State::Done,
        essential: false,
        parked_compute: 0,
    }; MAX_TASKS],
    ntasks: 0,
    current: None,
    runq: [0; MAX_TASKS],
    rq_len: 0,
    slots: [Slot::Empty; SLOTS],
    main: Context::ZERO,
    stats: Stats {
        faults: 0,
        parked: 0,
        readies: 0,
        matched: 0,
        ready_first: 0,
        wake_alls: 0,
        woken_by_all: 0,
        spurious: 0,
        stale: 0,
        idle_waits: 0,
        compute_during_waits: 0,
    },
    compute: None,
    watch: 0,
    on_fault: None,
};

/// TSC when the watched task parked (0 while it is not parked) and its token: the compute task
/// reads them to give up on a page-ready that never comes.
pub static WATCH_PARKED_TSC: AtomicU64 = AtomicU64::new(0);
pub static WATCH_TOKEN: AtomicU64 = AtomicU64::new(0);

fn sched() -> &'static mut Sched {
    // SAFETY: one CPU, and only the IF = 0 entry points (upcall, task exit, run's dispatch,
    // and the setup functions before `run`) take this reference; none of them can be
    // interrupted by another (no upcall while IF = 0) and none returns into another, so two
    // live references never overlap in time.
    unsafe { &mut *addr_of_mut!(SCHED) }
}

/// Sets up an empty scheduler. `compute` is the counter whose progress is measured while task
/// `watch` is parked; `on_fault(token, parked)` sees every NOT_PRESENT (selftests).
pub fn init(compute: &'static AtomicU64, watch: usize, on_fault: Option<fn(u32, bool)>) {
    let s = sched();
    s.compute = Some(compute);
    s.watch = watch;
    s.on_fault = on_fault;
}

/// Adds a task that runs `body(index)` at CPL3 with IF = 1 on the stack below `stack_top`
/// (16-byte aligned, the task's own). Tasks run in the order they were spawned.
pub fn spawn(body: fn(usize), essential: bool, stack_top: u64) -> usize {
    let s = sched();
    let i = s.ntasks;
    assert!(i < MAX_TASKS, "apf: too many tasks");
    s.ntasks += 1;
    let t = &mut s.tasks[i];
    *t = Task {
        ctx: Context::ZERO,
        state: State::Runnable,
        essential,
        parked_compute: 0,
    };
    apf::fxsave(&mut t.ctx.fx);
    let f = &mut t.ctx.frame;
    f.rip = task_start as extern "C" fn(u64, u64) -> ! as usize as u64;
    f.rsp = stack_top - 8;
    f.rdi = body as usize as u64;
    f.rsi = i as u64;
    f.rflags = 0x3002 | RFLAGS_IF;
    s.runq[s.rq_len] = i;
    s.rq_len += 1;
    i
}

/// Arms the upcall (on the stack below `upcall_stack_top`) and runs the tasks until every
/// essential one has finished (IF = 0 before and after).
pub fn run(upcall_stack_top: u64) {
    apf::arm(upcall, upcall_stack_top);
    // SAFETY: main's context is a static; `start` runs on this stack below the capture point
    // and never returns; the last essential task's exit resumes the context, returning here.
    unsafe { apf::capture(addr_of_mut!(SCHED.main), start, 0) };
    apf::disarm();
}

pub fn stats() -> Stats {
    sched().stats
}

/// Tokens still in the sleeper table: (sleepers, ready-first entries).
pub fn leftovers() -> (usize, usize) {
    let s = sched();
    let sleepers = s
        .slots
        .iter()
        .filter(|x| matches!(x, Slot::Sleeper { .. }))
        .count();
    let ready = s
        .slots
        .iter()
        .filter(|x| matches!(x, Slot::ReadyFirst { .. }))
        .count();
    (sleepers, ready)
}

extern "C" fn start(_: u64) -> ! {
    sched().dispatch(None)
}

extern "C" fn task_start(body: u64, index: u64) -> ! {
    // SAFETY: `spawn` stored a `fn(usize)` in the frame's rdi.
    let body = unsafe { core::mem::transmute::<usize, fn(usize)>(body as usize) };
    body(index as usize);
    user::set_interrupts(false);
    let s = sched();
    s.tasks[index as usize].state = State::Done;
    s.current = None;
    s.dispatch(None)
}

extern "C" fn upcall(frame: *const Frame, fx: *const Fx) -> ! {
    let s = sched();
    let Some(t) = s.current.take() else {
        crate::rt::finish(Err(crate::fail!(
            "apf: async-PF event with no task running"
        )));
    };
    // SAFETY: the CPL0 entry passed the interrupted frame (on its IST stack, which nothing
    // reuses before the next event, and none comes while IF = 0) and the FPU state that
    // tern_apf_upcall_entry saved.
    unsafe {
        s.tasks[t].ctx.frame = *frame;
        s.tasks[t].ctx.fx = *fx;
    }
    s.tasks[t].state = State::Runnable;
    s.dispatch(Some(t))
}

/// Tasks woken by one batch of events, in order.
#[derive(Default)]
struct Woken {
    list: [usize; MAX_TASKS],
    len: usize,
}

impl Sched {
    fn dispatch(&mut self, mut preempted: Option<usize>) -> ! {
        loop {
            let mut woken = Woken::default();
            apf::take_events(|e| match e {
                Event::NotPresent(token) => self.not_present(token, &mut preempted),
                Event::Ready(token) => self.ready(token, &mut woken),
            });
            if let Some(p) = preempted.take() {
                self.push_front(p);
            }
            for &w in woken.list[..woken.len].iter().rev() {
                self.push_front(w);
            }
            let tasks = &self.tasks[..self.ntasks];
            if tasks.iter().all(|t| !t.essential || t.state == State::Done) {
                self.current = None;
                // SAFETY: captured by `run` (IF = 0 in its frame).
                unsafe { apf::resume(&mut self.main) }
            }
            if self.rq_len > 0 {
                let t = self.runq[0];
                self.runq.copy_within(1..self.rq_len, 0);
                self.rq_len -= 1;
                self.current = Some(t);
                self.tasks[t].state = State::Running;
                self.tasks[t].ctx.frame.rflags |= RFLAGS_IF;
                // SAFETY: built by `spawn` or saved by the upcall; tasks run with IF = 1.
                unsafe { apf::resume(&mut self.tasks[t].ctx) }
            }
            self.stats.idle_waits += 1;
            apf::wait_event();
        }
    }

    fn push_front(&mut self, t: usize) {
        self.runq.copy_within(0..self.rq_len, 1);
        self.runq[0] = t;
        self.rq_len += 1;
    }

    fn compute_now(&self) -> u64 {
        self.compute.map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// A NOT_PRESENT concerns the task it interrupted.
    fn not_present(&mut self, token: u32, preempted: &mut Option<usize>) {
        self.stats.faults += 1;
        let Some(t) = *preempted else {
            crate::rt::finish(Err(crate::fail!(
                "apf: NOT_PRESENT {token:#x} with no interrupted task"
            )));
        };
        if let Some(i) = self.find(Slot::ReadyFirst { token }) {
            self.slots[i] = Slot::Empty;
            self.stats.ready_first += 1;
            self.stats.matched += 1;
            if let Some(hook) = self.on_fault {
                hook(token, false);
            }
            return;
        }
        self.insert(Slot::Sleeper { token, task: t });
        *preempted = None;
        self.stats.parked += 1;
        self.tasks[t].state = State::Parked;
        self.tasks[t].parked_compute = self.compute_now();
        if t == self.watch {
            WATCH_TOKEN.store(token as u64, Ordering::Relaxed);
            WATCH_PARKED_TSC.store(cpu::rdtsc().max(1), Ordering::Relaxed);
        }
        if let Some(hook) = self.on_fault {
            hook(token, true);
        }
    }

    fn ready(&mut self, token: u32, woken: &mut Woken) {
        self.stats.readies += 1;
        if token == 0 {
            self.stats.spurious += 1;
            return;
        }
        if token == apf::TOKEN_WAKE_ALL {
            self.stats.wake_alls += 1;
            for i in 0..SLOTS {
                match self.slots[i] {
                    Slot::Sleeper { task, .. } => {
                        self.slots[i] = Slot::Empty;
                        self.stats.woken_by_all += 1;
                        self.stats.matched += 1;
                        self.wake(task, woken);
                    }
                    Slot::ReadyFirst { .. } => {
                        self.slots[i] = Slot::Empty;
                        self.stats.stale += 1;
                    }
                    Slot::Empty => {}
                }
            }
            return;
        }
        let sleeper = self
            .slots
            .iter()
            .position(|s| matches!(*s, Slot::Sleeper { token: k, .. } if k == token));
        match sleeper {
            Some(i) => {
                let Slot::Sleeper { task, .. } = self.slots[i] else {
                    unreachable!()
                };
                self.slots[i] = Slot::Empty;
                self.stats.matched += 1;
                self.wake(task, woken);
            }
            None => self.insert(Slot::ReadyFirst { token }),
        }
    }

    fn wake(&mut self, t: usize, woken: &mut Woken) {
        self.tasks[t].state = State::Runnable;
        if t == self.watch {
            let during = self.compute_now() - self.tasks[t].parked_compute;
            self.stats.compute_during_waits += during;
            WATCH_PARKED_TSC.store(0, Ordering::Relaxed);
        }
        woken.list[woken.len] = t;
        woken.len += 1;
    }

    fn find(&self, slot: Slot) -> Option<usize> {
        self.slots.iter().position(|s| *s == slot)
    }

    fn insert(&mut self, slot: Slot) {
        match self.find(Slot::Empty) {
            Some(i) => self.slots[i] = slot,
            None => crate::rt::finish(Err(crate::fail!(
                "apf: sleeper table full ({SLOTS} tokens pending)"
            ))),
        }
    }
}

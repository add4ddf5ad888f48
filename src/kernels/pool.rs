//! The kernel threads: a few long-lived named threads (`attend-kernel-N`) that help the calling
//! thread drain a kernel's work queue.
//!
//! Why not a thread per kernel, or a sleeping pool: a UNet call of the bundled model runs hundreds
//! of kernels, many of them 50-500 us long. On the virtual 2-core machine attend is measured on,
//! starting a thread costs about 50 us, and waking a sleeping one (whose virtual core the host
//! has halted) costs up to a few hundred: a layer norm that takes 70 us on one thread took 300 us
//! "in parallel". So the kernel threads spin, waiting for the next job, for [`SPIN_BEFORE_SLEEP`]
//! after their last one (yielding the core now and then), and only then sleep: during a model
//! call the next kernel is never that far away; after it they go quiet within milliseconds.
//!
//! A job is the calling thread's `drain` closure, borrowed: the caller publishes it, drains too,
//! withdraws it, and waits until every kernel thread that picked it up has left it before
//! returning, so the borrow never outlives the call (the one `unsafe` lifetime erasure below).
//! Only one caller uses the pool at a time; others (nested or concurrent kernels) run inline.

use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// How long an idle kernel thread keeps spinning for the next job before it sleeps.
const SPIN_BEFORE_SLEEP: Duration = Duration::from_millis(3);
/// Spins between checks of the clock (and yields of the core).
const SPINS_PER_CHECK: u32 = 256;

/// A borrowed job with its lifetime erased (see the module docs for why it stays valid).
#[derive(Clone, Copy)]
struct JobRef(*const (dyn Fn() + Sync));

#[allow(unsafe_code)]
// SAFETY: the closure behind the pointer is `Sync` (callable from any thread), and the caller
// keeps it alive until every thread that took the pointer has finished calling it.
unsafe impl Send for JobRef {}

/// What the caller and the kernel threads share.
struct Shared {
    /// The published job (`None` between jobs) and how many threads sleep on `wake`.
    slot: Mutex<Slot>,
    wake: Condvar,
    /// Bumped with every published job; spinning threads watch it.
    generation: AtomicU64,
    /// Kernel threads inside the current job.
    active: AtomicUsize,
    /// Whether a caller holds the pool.
    busy: AtomicBool,
    /// A panic raised by the job on a kernel thread, handed back to the caller.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

struct Slot {
    job: Option<JobRef>,
    sleepers: usize,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The pool of kernel threads (at least one).
pub(super) struct KernelPool {
    shared: &'static Shared,
}

impl KernelPool {
    /// The process-wide pool of `threads` kernel threads, started on first use; `None` when no
    /// thread could be started (kernels then run on the calling thread).
    pub(super) fn global(threads: usize) -> Option<&'static KernelPool> {
        static POOL: OnceLock<Option<KernelPool>> = OnceLock::new();
        POOL.get_or_init(|| KernelPool::start(threads)).as_ref()
    }

    fn start(threads: usize) -> Option<KernelPool> {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            slot: Mutex::new(Slot {
                job: None,
                sleepers: 0,
            }),
            wake: Condvar::new(),
            generation: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            busy: AtomicBool::new(false),
            panic: Mutex::new(None),
        }));
        let started = (0..threads)
            .filter(|index| {
                std::thread::Builder::new()
                    .name(format!("attend-kernel-{index}"))
                    .spawn(move || kernel_thread(shared))
                    .is_ok()
            })
            .count();
        (started > 0).then_some(KernelPool { shared })
    }

    /// Runs `drain` on the calling thread and on the kernel threads at once, returning when all
    /// have finished; `false` (nothing run) when another caller holds the pool. A panic in
    /// `drain` on any thread is raised again here.
    pub(super) fn run(&self, drain: &(dyn Fn() + Sync)) -> bool {
        let shared = self.shared;
        if shared
            .busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        #[allow(unsafe_code)]
        // SAFETY: only the lifetime is erased. The job is withdrawn below before this function
        // returns or unwinds (the caller's own `drain` runs under `catch_unwind`), and the
        // function then waits until no kernel thread is inside it; a thread can only enter it
        // while it is published (checked under the slot's lock, where `active` is raised).
        let job = JobRef(unsafe {
            std::mem::transmute::<*const (dyn Fn() + Sync + '_), *const (dyn Fn() + Sync + 'static)>(
                drain,
            )
        });
        {
            let mut slot = lock(&shared.slot);
            slot.job = Some(job);
            shared.generation.fetch_add(1, Ordering::AcqRel);
            if slot.sleepers > 0 {
                shared.wake.notify_all();
            }
        }
        let own = catch_unwind(AssertUnwindSafe(drain));
        lock(&shared.slot).job = None;
        while shared.active.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        let theirs = lock(&shared.panic).take();
        shared.busy.store(false, Ordering::Release);
        if let Some(panic) = theirs {
            resume_unwind(panic);
        }
        if let Err(panic) = own {
            resume_unwind(panic);
        }
        true
    }
}

/// A kernel thread: wait for a job (spinning, then sleeping), help with it, repeat.
fn kernel_thread(shared: &'static Shared) {
    let mut seen = shared.generation.load(Ordering::Acquire);
    loop {
        seen = next_generation(shared, seen);
        let job = {
            let slot = lock(&shared.slot);
            slot.job.inspect(|_| {
                shared.active.fetch_add(1, Ordering::AcqRel);
            })
        };
        let Some(job) = job else {
            continue;
        };
        #[allow(unsafe_code)]
        // SAFETY: `active` was raised while the job was published, so its caller waits for this
        // call to end before the closure goes away (see `KernelPool::run`).
        let result = catch_unwind(AssertUnwindSafe(|| unsafe { (*job.0)() }));
        if let Err(panic) = result {
            lock(&shared.panic).get_or_insert(panic);
        }
        shared.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Waits until the job generation moves past `seen` and returns the new one: spinning for
/// [`SPIN_BEFORE_SLEEP`] (yielding the core every few hundred spins), then sleeping.
fn next_generation(shared: &Shared, seen: u64) -> u64 {
    let start = Instant::now();
    loop {
        for _ in 0..SPINS_PER_CHECK {
            let generation = shared.generation.load(Ordering::Acquire);
            if generation != seen {
                return generation;
            }
            std::hint::spin_loop();
        }
        if start.elapsed() < SPIN_BEFORE_SLEEP {
            std::thread::yield_now();
            continue;
        }
        let mut slot = lock(&shared.slot);
        while shared.generation.load(Ordering::Acquire) == seen {
            slot.sleepers += 1;
            slot = shared
                .wake
                .wait(slot)
                .unwrap_or_else(PoisonError::into_inner);
            slot.sleepers -= 1;
        }
        return shared.generation.load(Ordering::Acquire);
    }
}

#[cfg(test)]
mod tests {
    use super::super::threads::parallel_map;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_item_runs_once_with_concurrent_callers() {
        let callers: Vec<_> = (0..3)
            .map(|caller| {
                std::thread::Builder::new()
                    .name(format!("test-caller-{caller}"))
                    .spawn(move || {
                        for round in 0..200 {
                            let count = 1 + (round * 7 + caller) % 40;
                            let squares = parallel_map(count, true, |index| index * index);
                            let expected: Vec<usize> =
                                (0..count).map(|index| index * index).collect();
                            assert_eq!(squares, expected);
                        }
                    })
                    .unwrap()
            })
            .collect();
        for caller in callers {
            caller.join().unwrap();
        }
    }

    #[test]
    fn a_panic_in_a_job_reaches_the_caller_and_the_pool_stays_usable() {
        let ran = AtomicUsize::new(0);
        let result = std::panic::catch_unwind(|| {
            parallel_map(16, true, |index| {
                ran.fetch_add(1, Ordering::Relaxed);
                assert!(index != 5, "job 5 fails");
                index
            })
        });
        assert!(result.is_err());
        assert!(ran.load(Ordering::Relaxed) >= 1);
        assert_eq!(parallel_map(4, true, |index| index + 1), vec![1, 2, 3, 4]);
    }

    #[test]
    fn kernels_started_inside_a_job_run_inline() {
        let nested = parallel_map(4, true, |outer| {
            parallel_map(3, true, |inner| outer * 10 + inner)
                .into_iter()
                .sum::<usize>()
        });
        assert_eq!(nested, vec![3, 33, 63, 93]);
    }
}

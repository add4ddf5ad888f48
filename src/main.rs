//! The `attend` binary: the editor (no subcommand) and the scripting CLI (subcommands).
//! This is the application edge: errors become `anyhow` here and are printed once, with context.

mod cli;

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    keep_freed_memory_in_the_heap();
    park_candles_idle_threads_soon();
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// candle's own thread pool serves the few element-wise ops attend still leaves to candle; after
/// each one its threads spin 25,000 times before they sleep, on a 2-core machine taking a core
/// from attend's kernel threads while the next UNet call runs (1.3% of a generation's CPU
/// samples). A short spin keeps back-to-back candle ops on the pool and lets its threads sleep
/// right after (0.2%). The variable is candle's; a value the user set wins. Called before any
/// other thread exists.
fn park_candles_idle_threads_soon() {
    const SPIN_LIMIT: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(SPIN_LIMIT).is_none() {
        std::env::set_var(SPIN_LIMIT, "1000");
    }
}

/// Every UNet layer allocates and frees tensors of a few hundred KiB to tens of MiB. glibc's malloc
/// serves those with fresh `mmap`s and gives them back on free by default, so each layer pays page
/// faults and the kernel's page zeroing again (a third of a generation's CPU time on the bundled
/// model was system time). Raising the mmap and trim thresholds keeps freed blocks in the heap for
/// reuse: a 20-step generation of the bundled model took 11% less wall time (docs/benchmarks.md).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory_in_the_heap() {
    // glibc's largest allowed mmap threshold on 64-bit; blocks above it are still mapped.
    const MMAP_THRESHOLD_BYTES: libc::c_int = 32 << 20;
    const TRIM_THRESHOLD_BYTES: libc::c_int = 1 << 30;
    // SAFETY: `mallopt` only changes allocator tuning parameters; it is called before any other
    // thread exists, and an out-of-range value is rejected by glibc (return value 0), not UB.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES);
        // Blocks above the largest threshold (the 64 MiB of one 32x32 layer's captured
        // probabilities) come from the heap too instead of fresh mappings: SD 1.5 at 256 px with
        // capture, 1.62-1.64 -> 1.57-1.58 s per UNet call, peak RSS unchanged (docs/benchmarks.md).
        libc::mallopt(libc::M_MMAP_MAX, 0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory_in_the_heap() {}

//! Spreading a kernel over the cores: the worker count, a shared queue drained by the calling
//! thread and the kernel threads, and the ways work is cut (ranges of units, mutable
//! chunks, row blocks inside groups).
//! Small work runs inline on the calling thread.

use std::ops::Range;
use std::sync::OnceLock;

use candle_core::Result;

use super::bf16::{product_precision, with_product_precision};
use super::pool::KernelPool;

/// Below this many elements of work a kernel runs on the calling thread.
pub(super) const PARALLEL_MIN_ELEMENTS: usize = 1 << 16;

/// How many threads a kernel spreads its work over (the calling thread included).
pub(super) fn worker_count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    // The same count candle's own CPU kernels use (`RAYON_NUM_THREADS`, else the available cores).
    *COUNT.get_or_init(|| candle_core::utils::get_num_threads().max(1))
}

/// Runs `work` on every item of `items`, spread over up to `worker_count()` threads (the calling
/// thread and the kernel threads, see `pool.rs`) that take items from a shared queue; a thread
/// that comes late simply finds less left. Kernel threads multiply at the calling thread's
/// product precision. When the kernel threads are busy with another caller, this one runs alone.
pub(super) fn run_queue<I: Send>(items: Vec<I>, work: impl Fn(I) + Sync) {
    let workers = worker_count().min(items.len());
    let pool = KernelPool::global(worker_count().saturating_sub(1));
    let Some(pool) = pool.filter(|_| workers > 1) else {
        items.into_iter().for_each(work);
        return;
    };
    let queue = std::sync::Mutex::new(items);
    let next = || {
        queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()
    };
    let precision = product_precision();
    let drain = || {
        with_product_precision(precision, || {
            while let Some(item) = next() {
                work(item);
            }
        });
    };
    if !pool.run(&drain) {
        drain();
    }
}

/// How many pieces to cut `units` of `unit_cost` elements into (1 = run inline).
pub(super) fn piece_count(units: usize, unit_cost: usize) -> usize {
    if worker_count() <= 1 || units.saturating_mul(unit_cost) < PARALLEL_MIN_ELEMENTS {
        1
    } else {
        (2 * worker_count()).min(units).max(1)
    }
}

/// Splits `0..units` into contiguous ranges, runs `job` on each (in parallel when `units *
/// unit_cost` is large enough) and returns the results in range order.
pub(super) fn parallel_ranges<R: Send>(
    units: usize,
    unit_cost: usize,
    job: impl Fn(Range<usize>) -> R + Sync,
) -> Vec<R> {
    let pieces = piece_count(units, unit_cost);
    if pieces <= 1 {
        return vec![job(0..units)];
    }
    let per_piece = units.div_ceil(pieces);
    parallel_map(pieces, true, |index| {
        job((index * per_piece).min(units)..((index + 1) * per_piece).min(units))
    })
}

/// Runs `job(index)` for every index in `0..count`, on up to `worker_count()` threads when
/// `parallel`, and returns the results in index order.
pub fn parallel_map<R: Send>(
    count: usize,
    parallel: bool,
    job: impl Fn(usize) -> R + Sync,
) -> Vec<R> {
    if !parallel || count <= 1 || worker_count() <= 1 {
        return (0..count).map(job).collect();
    }
    let slots: Vec<std::sync::Mutex<Option<R>>> =
        (0..count).map(|_| std::sync::Mutex::new(None)).collect();
    // Reversed so that the queue (popped from the back) hands out low indices first.
    run_queue((0..count).rev().collect(), |index| {
        let result = job(index);
        *slots[index]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(result);
    });
    slots
        .into_iter()
        .filter_map(|slot| {
            slot.into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        })
        .collect()
}

/// Splits `data` (made of `units` equal units) into pieces and runs `job(first_unit, piece)` on
/// each, in parallel when `data` is large enough.
pub(super) fn parallel_chunks_mut<T: Send>(
    data: &mut [T],
    units: usize,
    job: impl Fn(usize, &mut [T]) + Sync,
) {
    let unit_len = data.len().checked_div(units).unwrap_or(0);
    let pieces = piece_count(units, unit_len);
    if pieces <= 1 || unit_len == 0 {
        job(0, data);
        return;
    }
    let per_piece = units.div_ceil(pieces);
    let items: Vec<(usize, &mut [T])> = data
        .chunks_mut(per_piece * unit_len)
        .enumerate()
        .map(|(index, piece)| (index * per_piece, piece))
        .collect();
    run_queue(items, |(first_unit, piece)| job(first_unit, piece));
}

/// Splits `rows` rows of a `[groups * group_rows, ...]` output into blocks of at most
/// `block_rows` that stay inside one group, calling `job(first_row_global, rows, row_in_piece)`.
pub(super) fn for_each_block(
    first_row: usize,
    rows_here: usize,
    group_rows: usize,
    block_rows: usize,
    mut job: impl FnMut(usize, usize, usize) -> Result<()>,
) -> Result<()> {
    let mut row = 0;
    while row < rows_here {
        let within = (first_row + row) % group_rows.max(1);
        let rows = block_rows.min(rows_here - row).min(group_rows - within);
        job(first_row + row, rows, row)?;
        row += rows;
    }
    Ok(())
}

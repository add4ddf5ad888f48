//! Output vectors that the workers initialise piece by piece: each piece is zeroed by the worker
//! about to write it (while it is in that core's cache), or handed back initialised by a product
//! and checked, instead of a serial zero fill on the calling thread. The `unsafe` of the kernels'
//! outputs lives here, each block with its SAFETY note.

use std::mem::MaybeUninit;

use candle_core::{Result, WithDType};

use super::gemm::PRODUCT_PARALLEL_MIN_MACS;
use super::threads::{for_each_block, parallel_chunks_mut, run_queue, PARALLEL_MIN_ELEMENTS};

/// Collects the first error of jobs that run on several threads.
#[derive(Default)]
struct FirstError(std::sync::Mutex<Option<candle_core::Error>>);

impl FirstError {
    fn record(&self, result: Result<()>) {
        if let Err(error) = result {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get_or_insert(error);
        }
    }

    fn into_result(self) -> Result<()> {
        match self
            .0
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

/// `slots` set to zero and handed back as values.
pub(super) fn zeroed<T: WithDType>(slots: &mut [MaybeUninit<T>]) -> &mut [T] {
    slots.fill(MaybeUninit::new(T::zero()));
    #[allow(unsafe_code)]
    // SAFETY: every slot was initialised on the line above, and `MaybeUninit<T>` has the size,
    // alignment and layout of `T`.
    unsafe {
        &mut *(std::ptr::from_mut(slots) as *mut [T])
    }
}

/// A vector of `len` values whose slots `fill` hands out, cut into pieces, to the workers, each
/// piece passed through [`zeroed`] before a kernel writes it. `vec![zero; len]` would zero the
/// whole buffer on the calling thread while the other cores wait (about 5% of a UNet call at
/// 256 px); here each core zeroes the piece it is about to write, while it is in its cache.
///
/// # Safety
/// `fill` must pass every slot through [`zeroed`] (or otherwise initialise it) before it
/// returns, unless it panics.
#[allow(unsafe_code)]
unsafe fn filled_in_pieces<T: WithDType>(
    len: usize,
    fill: impl FnOnce(&mut [MaybeUninit<T>]),
) -> Vec<T> {
    let mut buffer = Vec::with_capacity(len);
    fill(&mut buffer.spare_capacity_mut()[..len]);
    // SAFETY: `fill` initialised all `len` slots (the caller's contract); a panic in it unwinds
    // past this line and drops the vector empty.
    unsafe {
        buffer.set_len(len);
    }
    buffer
}

/// Bytes of output a worker zeroes at once, right before its job writes them: they are still in
/// the core's L1 cache then, so the output goes to memory once (a whole piece zeroed first went
/// twice, and the zeroing was 5-7% of a UNet call).
const ZEROED_AT_ONCE_BYTES: usize = 32 * 1024;

/// A vector of `len` values (`units` equal units) made by `job(first_unit, piece)` over pieces of
/// whole units, as [`parallel_chunks_mut`] cuts them and then in L1-sized parts, each part zeroed
/// first by its worker (so values a kernel skips, such as padding, are zero).
pub(super) fn parallel_filled<T: WithDType>(
    len: usize,
    units: usize,
    job: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T> {
    let unit_len = len.checked_div(units).unwrap_or(0).max(1);
    let units_at_once = (ZEROED_AT_ONCE_BYTES / (unit_len * std::mem::size_of::<T>())).max(1);
    #[allow(unsafe_code)]
    // SAFETY: `parallel_chunks_mut` hands every slot to exactly one job (its pieces cover the
    // slice, or the whole slice goes to one job), and each job zeroes every part of its piece
    // before the kernel sees it.
    unsafe {
        filled_in_pieces(len, |slots| {
            parallel_chunks_mut(slots, units, |first, piece| {
                for (index, part) in piece.chunks_mut(units_at_once * unit_len).enumerate() {
                    job(first + index * units_at_once, zeroed(part));
                }
            });
        })
    }
}

/// Runs `job` on `slots`, which must hand all of them back initialised (for instance through
/// [`gemm_uninit`](super::gemm::gemm_uninit)); the returned slice is checked against `slots` by address and length. When
/// the job fails or hands back less, `slots` are zeroed and an error returned, so that `slots`
/// are initialised whatever happens.
fn initialise_piece(
    slots: &mut [MaybeUninit<f32>],
    job: impl for<'a> FnOnce(&'a mut [MaybeUninit<f32>]) -> Result<&'a mut [f32]>,
) -> Result<()> {
    let (start, len) = (slots.as_ptr().cast::<f32>(), slots.len());
    let result = job(&mut *slots).and_then(|values| {
        if std::ptr::eq(values.as_ptr(), start) && values.len() == len {
            Ok(())
        } else {
            candle_core::bail!(
                "kernel output: a piece of {len} values came back with {} initialised",
                values.len()
            )
        }
    });
    if result.is_err() {
        zeroed(slots);
    }
    result
}

/// A vector of `len` values cut into consecutive pieces `(tag, length)`, each made by
/// `job(tag, piece)`, which hands its piece back initialised (see [`initialise_piece`]), so nothing
/// is zeroed first. Slots past the last piece are zeroed. The pieces go to the cores from a queue
/// when `parallel`; returns the first error any piece met.
pub(super) fn parallel_initialised(
    len: usize,
    pieces: &[(usize, usize)],
    parallel: bool,
    job: impl for<'a> Fn(usize, &'a mut [MaybeUninit<f32>]) -> Result<&'a mut [f32]> + Sync,
) -> Result<Vec<f32>> {
    let failure = FirstError::default();
    #[allow(unsafe_code)]
    // SAFETY: the pieces are consecutive cuts of the slots and whatever is left after the last one
    // is zeroed; `initialise_piece` leaves every piece initialised.
    let out = unsafe {
        filled_in_pieces(len, |slots| {
            let mut cut = Vec::with_capacity(pieces.len());
            let mut rest = slots;
            for &(tag, length) in pieces {
                let length = length.min(rest.len());
                let (piece, tail) = std::mem::take(&mut rest).split_at_mut(length);
                cut.push((tag, piece));
                rest = tail;
            }
            zeroed(rest);
            let run = |(tag, piece): (usize, &mut [MaybeUninit<f32>])| {
                failure.record(initialise_piece(piece, |piece| job(tag, piece)));
            };
            if parallel && cut.len() > 1 {
                // Reversed: the queue hands out its last item first.
                cut.reverse();
                run_queue(cut, run);
            } else {
                cut.into_iter().for_each(run);
            }
        })
    };
    failure.into_result().map(|()| out)
}

/// A vector of `len` values made by `job(index, piece)` over consecutive pieces of `piece_len`
/// values (the last one shorter), queued to the cores when `len * cost_per_value` reaches
/// [`PRODUCT_PARALLEL_MIN_MACS`]: for products, whose GEMM writes every value (cost: the inner
/// dimension).
pub(super) fn parallel_pieces(
    len: usize,
    piece_len: usize,
    cost_per_value: usize,
    job: impl for<'a> Fn(usize, &'a mut [MaybeUninit<f32>]) -> Result<&'a mut [f32]> + Sync,
) -> Result<Vec<f32>> {
    let piece_len = piece_len.max(1);
    let pieces: Vec<_> = (0..len.div_ceil(piece_len))
        .map(|index| (index, piece_len.min(len - index * piece_len)))
        .collect();
    let parallel = len.saturating_mul(cost_per_value) >= PRODUCT_PARALLEL_MIN_MACS;
    parallel_initialised(len, &pieces, parallel, job)
}

/// `planes` planes of `plane_len` values made by `job(first, pieces)`, where `pieces` holds the
/// same range of every plane (`first..first + piece_len`, the last range shorter), the ranges
/// spread over the cores and zeroed first by their worker.
pub(super) fn parallel_filled_planes(
    planes: usize,
    plane_len: usize,
    piece_len: usize,
    job: impl Fn(usize, Vec<&mut [f32]>) + Sync,
) -> Vec<f32> {
    let piece_len = piece_len.max(1);
    #[allow(unsafe_code)]
    // SAFETY: the pieces, `piece_len` chunks of every `plane_len` chunk of the slots, cover all of
    // them, and each worker zeroes all of its pieces before its job sees them.
    unsafe {
        filled_in_pieces(planes * plane_len, |slots| {
            let mut items: Vec<(usize, Vec<&mut [MaybeUninit<f32>]>)> = (0..plane_len
                .div_ceil(piece_len))
                .map(|index| (index * piece_len, Vec::with_capacity(planes)))
                .collect();
            for plane in slots.chunks_mut(plane_len.max(1)) {
                for (item, piece) in items.iter_mut().zip(plane.chunks_mut(piece_len)) {
                    item.1.push(piece);
                }
            }
            run_queue(items, |(first, pieces)| {
                job(first, pieces.into_iter().map(zeroed).collect());
            });
        })
    }
}

/// A `[rows, row_len]` output made by `job(first_row, block)` over blocks of at most
/// `block_rows` rows that stay inside one group of `group_rows` rows, queued to the cores; each
/// job hands its block back initialised (see [`parallel_initialised`]).
pub(super) fn parallel_row_blocks(
    rows: usize,
    row_len: usize,
    group_rows: usize,
    block_rows: usize,
    job: impl for<'a> Fn(usize, &'a mut [MaybeUninit<f32>]) -> Result<&'a mut [f32]> + Sync,
) -> Result<Vec<f32>> {
    let mut blocks = Vec::new();
    for_each_block(0, rows, group_rows, block_rows, |first, count, _| {
        blocks.push((first, count * row_len));
        Ok(())
    })?;
    let len = rows * row_len;
    parallel_initialised(len, &blocks, len >= PARALLEL_MIN_ELEMENTS, job)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_pieces_come_back_initialised_or_fail() {
        let mut slots = vec![MaybeUninit::new(7f32); 6];
        // A job that initialises only part of its piece is an error, and the piece is zeroed.
        let short = initialise_piece(&mut slots, |piece| Ok(zeroed(&mut piece[..4])));
        assert!(short.unwrap_err().to_string().contains("4 initialised"));
        let failed = initialise_piece(&mut slots, |_| candle_core::bail!("no product"));
        assert!(failed.unwrap_err().to_string().contains("no product"));
        initialise_piece(&mut slots, |piece| {
            let values = zeroed(piece);
            values.fill(2.0);
            Ok(values)
        })
        .unwrap();
        // A failing block's error comes back from the whole output, large or small.
        for rows in [4, 4096] {
            let result = parallel_row_blocks(rows, 32, rows, 2, |first, block| {
                if first == rows / 2 {
                    candle_core::bail!("block at row {first}");
                }
                Ok(zeroed(block))
            });
            let expected = format!("block at row {}", rows / 2);
            assert!(result.unwrap_err().to_string().contains(&expected));
        }
        let out = parallel_pieces(10_000, 3_000, 16, |index, piece| {
            let values = zeroed(piece);
            values.fill(index as f32);
            Ok(values)
        })
        .unwrap();
        assert_eq!(
            (out[0], out[2_999], out[3_000], out[9_999]),
            (0.0, 0.0, 1.0, 3.0)
        );
    }
}

//! The f32 fused attention's two products for one block of queries of one head, in AVX-512
//! intrinsics: the scores `q k^T` (`[rows, keys]`) from the head's transposed keys, and the
//! exponentials' product with the values, divided by the row sums, written straight into the
//! output rows. Both keep their operands where they lie: no packing, one pass over the scores
//! per product (the general GEMM repacked every block's `rows x keys` exponentials).
//!
//! Register tiles of 8 query rows by up to 48 columns (3 vectors): the scores' columns are keys
//! (loaded from a row of a panel of `k^T`, each query value broadcast), the values' columns are a
//! head's `d` outputs (each exponential broadcast, a row of values loaded).
//!
//! Both products keep their right-hand operand in the L1 cache while all query tiles of a block
//! pass over it: the keys as panels of 48 keys (`[d, 48]` each, [`key_panels`]; `k^T`'s own rows
//! are a power of two apart, so its columns would share a handful of cache sets), the values in
//! runs of [`VALUE_RUN`] keys, from a copy whose rows are padded to whole vectors with zeros
//! ([`padded_head_dim`]), with the sums carried between runs in a per-thread scratch.
//!
//! Without a head mean to add, many keys go chunk by chunk instead ([`attention_in_chunks`]): a
//! group of 32 query rows takes 480 keys at a time through both products with the online softmax
//! (running row maxima; the earlier sums rescaled when a maximum grows), so a chunk's scores stay
//! in the core's caches rather than a 2 MiB block of them.
//!
//! Each entry point returns `false` (nothing written) where this CPU has no AVX-512 F or the
//! shapes do not suit it; the caller then runs the general products.

/// Query rows per register tile.
const TILE_ROWS: usize = 8;

/// Vectors (of 16 columns) per register tile, at most.
const TILE_VECTORS: usize = 3;

/// Keys per run of the values product: `VALUE_RUN x 48` values (24 KiB) stay in the L1 cache.
const VALUE_RUN: usize = 128;

/// Keys per panel of [`key_panels`].
const PANEL_KEYS: usize = TILE_VECTORS * 16;

thread_local! {
    /// Each thread's sums of [`weighted_values`] between runs of keys.
    static SUMS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// A head's transposed keys `key_t[offset..]` (`[d, keys]`, rows `keys` apart) as panels of 48
/// keys, each `[d, width]`, for [`scores`]: the last one narrower, its rows padded with zeros to
/// whole vectors ([`panels_len`] values in all); `None` where [`available`] is not or the view
/// does not fit its slice.
pub(super) fn key_panels(
    key_t: &[f32],
    offset: usize,
    (head_dim, keys): (usize, usize),
) -> Option<Vec<f32>> {
    if !available(keys) || !fits(key_t.len(), offset, (head_dim, keys), keys) {
        return None;
    }
    let mut panels = Vec::with_capacity(panels_len(head_dim, keys));
    for first in (0..keys).step_by(PANEL_KEYS) {
        let width = PANEL_KEYS.min(keys - first);
        let padded = width.div_ceil(16) * 16;
        for row in 0..head_dim {
            panels.extend_from_slice(&key_t[offset + row * keys + first..][..width]);
            panels.resize(panels.len() + padded - width, 0.0);
        }
    }
    Some(panels)
}

/// Values in a head's [`key_panels`]: `d` rows of the keys rounded up to whole vectors (every
/// panel but the last is 48 keys wide, so only the last one is padded).
pub(super) fn panels_len(head_dim: usize, keys: usize) -> usize {
    head_dim * keys.div_ceil(16) * 16
}

/// `head_dim` rounded up to whole 16-lane vectors: the row length of the values copy that
/// [`weighted_values`] reads.
pub(super) fn padded_head_dim(head_dim: usize) -> usize {
    head_dim.div_ceil(16) * 16
}

/// Whether this CPU runs these kernels, for `keys` keys (at least one).
pub(super) fn available(keys: usize) -> bool {
    keys > 0 && cpu_supported()
}

#[cfg(target_arch = "x86_64")]
fn cpu_supported() -> bool {
    super::winograd::x86::supported()
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_supported() -> bool {
    false
}

/// Whether a `rows x cols` matrix at `offset`, rows `stride` apart, lies inside `len` values.
fn fits(len: usize, offset: usize, (rows, cols): (usize, usize), stride: usize) -> bool {
    rows == 0 || cols == 0 || offset + (rows - 1) * stride + cols <= len
}

/// `scores[r * keys + k] = sum_i query[q_off + r * q_stride + i] * key_t[i][k]` for `rows`
/// queries of `head_dim` values and `keys` keys, `key_t` given as its [`key_panels`]. `false`
/// (nothing written) when [`available`] is not or a view does not fit its slice.
pub(super) fn scores(
    scores: &mut [f32],
    (query, query_offset, query_stride): (&[f32], usize, usize),
    panels: &[f32],
    (rows, keys, head_dim): (usize, usize, usize),
) -> bool {
    if !available(keys)
        || head_dim == 0
        || scores.len() < rows * keys
        || !fits(query.len(), query_offset, (rows, head_dim), query_stride)
        || panels.len() != panels_len(head_dim, keys)
    {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[allow(unsafe_code)]
        // SAFETY: AVX-512 F is present (`available`); every view was checked to lie inside its
        // slice above; the tiles read whole vectors of the padded panels and store masked to
        // each row's `keys` scores.
        unsafe {
            x86::scores(
                (scores.as_mut_ptr(), keys),
                query.as_ptr().add(query_offset),
                query_stride,
                panels.as_ptr(),
                (rows, keys, head_dim),
            );
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Each `keys`-long row of `scores` -> `e^(scale * (v - max))` in place (`max` the row's
/// largest value), each row's sum to `sums`: the softmax of [`scores`]' block before
/// [`weighted_values`]. The exponentials come from a degree-6 polynomial for `2^f` on `[-1/2,
/// 1/2]` (relative error below 1e-7) scaled by `2^n`, at least `2^-126` (no subnormal
/// weights). `false` (nothing written) when [`available`] is not or the sizes do not match.
pub(super) fn exp_rows(scores: &mut [f32], keys: usize, scale: f32, sums: &mut [f32]) -> bool {
    if !available(keys) || scores.len() != sums.len() * keys {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[allow(unsafe_code)]
        // SAFETY: AVX-512 F is present (`available`); `scores` holds `sums.len()` rows of `keys`
        // values (checked above), read and written in whole vectors and a masked tail.
        unsafe {
            x86::exp_rows(scores, keys, scale, sums);
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = scale;
        false
    }
}

/// `mean[r * keys + k] += exps[r * keys + k] * (weight / sums[r])` for every row `r` of `exps`
/// (`[sums.len(), keys]`, the exponentials of [`exp_rows`]): each row's probabilities, times
/// `weight`, added to the head mean. `false` (nothing written) when [`available`] is not or the
/// sizes do not match.
pub(super) fn add_probabilities(mean: &mut [f32], exps: &[f32], sums: &[f32], weight: f32) -> bool {
    let keys = exps.len() / sums.len().max(1);
    if !available(keys) || exps.len() != sums.len() * keys || mean.len() != exps.len() {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[allow(unsafe_code)]
        // SAFETY: AVX-512 F is present (`available`); `mean` and `exps` both hold `sums.len()`
        // rows of `keys` values (checked above), touched in whole vectors and a masked tail.
        unsafe {
            x86::add_probabilities(mean, exps, sums, weight);
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = weight;
        false
    }
}

/// Keys per chunk of [`attention_in_chunks`]: ten panels. A group's chunk of scores (60 KiB)
/// stays in the core's caches from its product to its exponentials to the product with the
/// values. One layer of 2 x 8 heads of 40 (best of 10, two threads): 4096 queries and keys 173 ms
/// in chunks of 480 keys, 181 ms in chunks of 192; 1024 x 1024 the same for both.
const CHUNK_KEYS: usize = 10 * PANEL_KEYS;

/// Query rows per group of [`attention_in_chunks`]: four register tiles share each chunk's keys
/// and values.
const GROUP_ROWS: usize = 4 * TILE_ROWS;

/// A thread's buffers for [`attention_in_chunks`]: a group's chunk of scores (`[GROUP_ROWS,
/// CHUNK_KEYS]`) and its output sums (`[GROUP_ROWS, padded]`).
#[derive(Default)]
pub(super) struct ChunkScratch {
    scores: Vec<f32>,
    sums: Vec<f32>,
}

thread_local! {
    /// Each thread's [`ChunkScratch`].
    static CHUNKS: std::cell::Cell<ChunkScratch> = std::cell::Cell::new(ChunkScratch::default());
}

/// Whether [`attention_in_chunks`] suits `keys` keys: more than one chunk of them, unless the
/// environment variable `ATTEND_NO_ATTENTION_CHUNKS` is set (then every f32 fused attention keeps
/// a block of scores, for comparisons).
pub(super) fn chunks_suit(keys: usize) -> bool {
    static WANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let wanted = *WANTED.get_or_init(|| std::env::var_os("ATTEND_NO_ATTENTION_CHUNKS").is_none());
    wanted && keys > CHUNK_KEYS && available(keys)
}

/// `out[offset + r * stride..][..head_dim] = softmax(scale * q_r k^T) v` for `rows` query rows
/// (`query[query_offset + r * query_stride..]`), the keys given as their [`key_panels`] and the
/// values as `[keys, padded]` ([`padded_head_dim`], the padding zero), without a block of scores:
/// groups of rows pass over the keys chunk by chunk, each chunk's exponentials taken against the
/// running row maximum and the earlier chunks' sums rescaled when it grows (the online softmax),
/// so every chunk's scores stay in the core's caches. `false` (nothing written) when [`available`] is
/// not or a view does not fit its slice.
pub(super) fn attention_in_chunks(
    (out, offset, stride): (&mut [f32], usize, usize),
    (query, query_offset, query_stride): (&[f32], usize, usize),
    (panels, values): (&[f32], &[f32]),
    (rows, keys, head_dim): (usize, usize, usize),
    scale: f32,
) -> bool {
    if !available(keys)
        || head_dim == 0
        || panels.len() != panels_len(head_dim, keys)
        || values.len() < keys * padded_head_dim(head_dim)
        || !fits(query.len(), query_offset, (rows, head_dim), query_stride)
        || !fits(out.len(), offset, (rows, head_dim), stride)
    {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let mut scratch = CHUNKS.take();
        #[allow(unsafe_code)]
        // SAFETY: AVX-512 F is present (`available`); every view was checked to lie inside its
        // slice above; the scratch buffers are sized inside.
        unsafe {
            x86::attention_in_chunks(
                (out.as_mut_ptr().add(offset), stride),
                (query.as_ptr().add(query_offset), query_stride),
                (panels.as_ptr(), values.as_ptr()),
                (rows, keys, head_dim),
                scale,
                &mut scratch,
            );
        }
        CHUNKS.set(scratch);
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (out, query, panels, values, scale);
        false
    }
}

/// `out[offset + r * stride + c] = inverses[r] * sum_k weights[r * keys + k] * values[k *
/// padded + c]` for the `rows` rows of `weights` (`[rows, keys]`) and the first `head_dim`
/// columns `c` of `values` (`[keys, padded]`, `padded` = [`padded_head_dim`], the padding
/// zero). `false` (nothing written) when [`available`] is not or a view does not fit its slice.
pub(super) fn weighted_values(
    (out, offset, stride): (&mut [f32], usize, usize),
    weights: &[f32],
    values: &[f32],
    inverses: &[f32],
    (keys, head_dim): (usize, usize),
) -> bool {
    let rows = inverses.len();
    let padded = padded_head_dim(head_dim);
    if !available(keys)
        || head_dim == 0
        || weights.len() < rows * keys
        || values.len() < keys * padded
        || !fits(out.len(), offset, (rows, head_dim), stride)
    {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let mut sums = SUMS.take();
        sums.clear();
        sums.resize(rows * padded, 0.0);
        #[allow(unsafe_code)]
        // SAFETY: AVX-512 F is present (`available`); the weights, values and output views were
        // checked above and `sums` holds `rows` padded rows. Value loads and sums are whole
        // vectors inside padded rows; output stores are masked to a row's first `head_dim`
        // columns.
        unsafe {
            x86::weighted_values(
                out.as_mut_ptr().add(offset),
                stride,
                weights.as_ptr(),
                values.as_ptr(),
                (inverses, sums.as_mut_ptr()),
                (keys, head_dim),
            );
        }
        SUMS.set(sums);
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (out, offset, stride, weights, values);
        false
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    //! The register tiles. Callers guarantee AVX-512 F and that every pointer covers the
    //! matrix it is given.

    use super::{
        padded_head_dim, ChunkScratch, CHUNK_KEYS, GROUP_ROWS, PANEL_KEYS, TILE_ROWS, TILE_VECTORS,
        VALUE_RUN,
    };
    use crate::kernels::bf16::x86::lanes;
    use crate::kernels::softmax_bf16::x86::{add_scaled, row_max};
    use std::arch::x86_64::*;

    /// Runs `$call` with the constant `$rows` set to `$count` (1 to [`TILE_ROWS`]): a tile's row
    /// count as a const generic.
    macro_rules! with_tile_rows {
        ($count:expr, $rows:ident => $call:expr) => {
            match $count {
                8 => {
                    const $rows: usize = 8;
                    $call
                }
                7 => {
                    const $rows: usize = 7;
                    $call
                }
                6 => {
                    const $rows: usize = 6;
                    $call
                }
                5 => {
                    const $rows: usize = 5;
                    $call
                }
                4 => {
                    const $rows: usize = 4;
                    $call
                }
                3 => {
                    const $rows: usize = 3;
                    $call
                }
                2 => {
                    const $rows: usize = 2;
                    $call
                }
                _ => {
                    const $rows: usize = 1;
                    $call
                }
            }
        };
    }

    /// The coefficients `c1..c6` of `2^f ~ 1 + c1 f + ... + c6 f^6` on `[-1/2, 1/2]` (fitted
    /// for the least largest relative error).
    const EXP2: [f32; 6] = [
        std::f32::consts::LN_2,
        0.240_226_48,
        0.055_503_324,
        0.009_618_439,
        0.001_339_888_2,
        0.000_153_530_11,
    ];

    /// `2^t`, sixteen at a time, for `t` at least -126 (smaller `t` give `2^-126`): `2^n *
    /// 2^f` with `n` the integer nearest `t`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn exp2(t: __m512) -> __m512 {
        let t = _mm512_max_ps(t, _mm512_set1_ps(-126.0));
        let round = _mm512_set1_ps(12_582_912.0);
        let n = _mm512_sub_ps(_mm512_add_ps(t, round), round);
        let f = _mm512_sub_ps(t, n);
        let mut p = _mm512_set1_ps(EXP2[5]);
        for &c in EXP2[..5].iter().rev() {
            p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(_mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0)), n)
    }

    /// See [`super::exp_rows`].
    ///
    /// # Safety
    /// AVX-512 F present; `scores` holds `sums.len()` rows of `keys` values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_rows(scores: &mut [f32], keys: usize, scale: f32, sums: &mut [f32]) {
        let slope = scale * std::f32::consts::LOG2_E;
        for (row, sum) in scores.chunks_exact_mut(keys).zip(sums.iter_mut()) {
            *sum = exp_row(row, row_max(row), slope);
        }
    }

    /// `row` -> `2^(slope * (v - max))` in place; returns the row's sum.
    ///
    /// # Safety
    /// AVX-512 F present.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn exp_row(row: &mut [f32], max: f32, slope: f32) -> f32 {
        let (at, keys) = (row.as_mut_ptr(), row.len());
        let (slope, max) = (_mm512_set1_ps(slope), _mm512_set1_ps(max));
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut start = 0;
        while start + 64 <= keys {
            for (vector, acc) in acc.iter_mut().enumerate() {
                let at = at.add(start + vector * 16);
                let t = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(at), max), slope);
                let e = exp2(t);
                *acc = _mm512_add_ps(*acc, e);
                _mm512_storeu_ps(at, e);
            }
            start += 64;
        }
        while start < keys {
            let (mask, at) = (lanes(keys - start), at.add(start));
            let t = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, at), max), slope);
            let e = exp2(t);
            acc[0] = _mm512_mask_add_ps(acc[0], mask, acc[0], e);
            _mm512_mask_storeu_ps(at, mask, e);
            start += 16;
        }
        let pair = (_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        _mm512_reduce_add_ps(_mm512_add_ps(pair.0, pair.1))
    }

    /// See [`super::attention_in_chunks`]: groups of [`GROUP_ROWS`] query rows, each passing
    /// over the keys chunk by chunk with its running maxima, sums and output sums.
    ///
    /// # Safety
    /// AVX-512 F present; `out` covers `rows` rows of `head_dim` values `stride` apart, `query`
    /// `rows` rows of `head_dim` values `query_stride` apart, `panels` the keys' panels
    /// ([`super::panels_len`] values), `values` `keys` rows of [`padded_head_dim`] values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn attention_in_chunks(
        (out, stride): (*mut f32, usize),
        (query, query_stride): (*const f32, usize),
        (panels, values): (*const f32, *const f32),
        (rows, keys, head_dim): (usize, usize, usize),
        scale: f32,
        scratch: &mut ChunkScratch,
    ) {
        let padded = padded_head_dim(head_dim);
        let slope = scale * std::f32::consts::LOG2_E;
        let ChunkScratch {
            scores,
            sums: output_sums,
        } = scratch;
        scores.resize(GROUP_ROWS * CHUNK_KEYS, 0.0);
        output_sums.resize(GROUP_ROWS * padded, 0.0);
        let mut first_row = 0;
        while first_row < rows {
            let group = GROUP_ROWS.min(rows - first_row);
            let query = query.add(first_row * query_stride);
            output_sums.fill(0.0);
            let mut maxima = [f32::NEG_INFINITY; GROUP_ROWS];
            let mut totals = [0f32; GROUP_ROWS];
            let mut first_key = 0;
            while first_key < keys {
                let chunk = CHUNK_KEYS.min(keys - first_key);
                let chunk_panels = panels.add(first_key * head_dim);
                let shape = (group, chunk, head_dim);
                self::scores(
                    (scores.as_mut_ptr(), CHUNK_KEYS),
                    query,
                    query_stride,
                    chunk_panels,
                    shape,
                );
                for row in 0..group {
                    let weights = &mut scores[row * CHUNK_KEYS..][..chunk];
                    let max = row_max(weights).max(maxima[row]);
                    // The earlier chunks' weights, relative to the new maximum.
                    let rescale = if maxima[row] == f32::NEG_INFINITY {
                        0.0
                    } else {
                        let t = _mm512_set1_ps((maxima[row] - max) * slope);
                        _mm512_cvtss_f32(exp2(t))
                    };
                    let sum = exp_row(weights, max, slope);
                    totals[row] = totals[row] * rescale + sum;
                    maxima[row] = max;
                    let rescale = _mm512_set1_ps(rescale);
                    for column in (0..padded).step_by(16) {
                        let at = output_sums.as_mut_ptr().add(row * padded + column);
                        _mm512_storeu_ps(at, _mm512_mul_ps(_mm512_loadu_ps(at), rescale));
                    }
                }
                let chunk_values = values.add(first_key * padded);
                let mut row = 0;
                while row < group {
                    let count = (group - row).min(TILE_ROWS);
                    let dst = (output_sums.as_mut_ptr().add(row * padded), padded);
                    let src = (scores.as_ptr().add(row * CHUNK_KEYS), CHUNK_KEYS);
                    with_tile_rows!(count, R => value_rows::<R>(dst, src, chunk_values, chunk));
                    row += count;
                }
                first_key += chunk;
            }
            for (row, &total) in totals.iter().enumerate().take(group) {
                let inverse = _mm512_set1_ps(1.0 / total);
                for column in (0..head_dim).step_by(16) {
                    let mask = lanes(head_dim - column);
                    let sum = _mm512_loadu_ps(output_sums.as_ptr().add(row * padded + column));
                    let dst = out.add((first_row + row) * stride + column);
                    _mm512_mask_storeu_ps(dst, mask, _mm512_mul_ps(sum, inverse));
                }
            }
            first_row += group;
        }
    }

    /// See [`super::add_probabilities`].
    ///
    /// # Safety
    /// AVX-512 F present; `mean` and `exps` hold `sums.len()` rows of `exps.len() / sums.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn add_probabilities(
        mean: &mut [f32],
        exps: &[f32],
        sums: &[f32],
        weight: f32,
    ) {
        let keys = exps.len() / sums.len();
        let rows = mean.chunks_exact_mut(keys).zip(exps.chunks_exact(keys));
        for ((mean, exps), &sum) in rows.zip(sums) {
            add_scaled(mean, exps, weight / sum);
        }
    }

    /// Scores of `R` query rows (`query`, rows `query_stride` apart) by the `columns` keys of a
    /// panel (rows `16V` apart, `columns` at most that) into `scores` (rows `keys` apart).
    ///
    /// # Safety
    /// AVX-512 F present; the pointers cover `R x head_dim`, `head_dim x 16V` and `R x columns`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn score_tile<const R: usize, const V: usize>(
        (scores, keys): (*mut f32, usize),
        (query, query_stride): (*const f32, usize),
        (panel, columns): (*const f32, usize),
        head_dim: usize,
    ) {
        let width = V * 16;
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        for i in 0..head_dim {
            let mut key = [_mm512_setzero_ps(); V];
            for (vector, key) in key.iter_mut().enumerate() {
                *key = _mm512_loadu_ps(panel.add(i * width + vector * 16));
            }
            for (row, acc) in acc.iter_mut().enumerate() {
                let q = _mm512_set1_ps(*query.add(row * query_stride + i));
                for (acc, &key) in acc.iter_mut().zip(&key) {
                    *acc = _mm512_fmadd_ps(q, key, *acc);
                }
            }
        }
        for (row, acc) in acc.iter().enumerate() {
            for (vector, &acc) in acc.iter().enumerate() {
                let mask = lanes(columns.saturating_sub(vector * 16));
                _mm512_mask_storeu_ps(scores.add(row * keys + vector * 16), mask, acc);
            }
        }
    }

    /// One panel's scores (`columns` keys, rows `16V` apart) for all `rows` queries, in tiles of
    /// [`TILE_ROWS`] rows.
    ///
    /// # Safety
    /// As [`score_tile`], for `rows` rows.
    #[target_feature(enable = "avx512f")]
    unsafe fn score_panel<const V: usize>(
        (scores, keys): (*mut f32, usize),
        (query, query_stride): (*const f32, usize),
        (panel, columns): (*const f32, usize),
        (rows, head_dim): (usize, usize),
    ) {
        let mut row = 0;
        while row < rows {
            let dst = (scores.add(row * keys), keys);
            let src = (query.add(row * query_stride), query_stride);
            let panel = (panel, columns);
            let count = (rows - row).min(TILE_ROWS);
            with_tile_rows!(count, R => score_tile::<R, V>(dst, src, panel, head_dim));
            row += count;
        }
    }

    /// `[rows, keys]` scores of `rows` queries, panel by panel (each panel stays in the L1
    /// cache while every query tile passes).
    ///
    /// # Safety
    /// AVX-512 F present; `scores` covers `rows x keys` (rows `stride` apart), `query` `rows` rows
    /// of `head_dim` values `query_stride` apart, `panels` the key panels (`keys` of them).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scores(
        (scores, stride): (*mut f32, usize),
        query: *const f32,
        query_stride: usize,
        panels: *const f32,
        (rows, keys, head_dim): (usize, usize, usize),
    ) {
        let query = (query, query_stride);
        let mut first = 0;
        while first < keys {
            let dst = (scores.add(first), stride);
            let columns = (keys - first).min(PANEL_KEYS);
            let panel = (panels.add(first * head_dim), columns);
            let shape = (rows, head_dim);
            match columns.div_ceil(16) {
                3 => score_panel::<3>(dst, query, panel, shape),
                2 => score_panel::<2>(dst, query, panel, shape),
                _ => score_panel::<1>(dst, query, panel, shape),
            }
            first += PANEL_KEYS;
        }
    }

    /// Adds to `R` rows of sums (`sums`, rows `padded` apart, `16V` columns) the weighted sum of
    /// `run` rows of values (from `values`, rows `padded` apart) by `R` rows of weights (rows
    /// `keys` apart).
    ///
    /// # Safety
    /// AVX-512 F present; `weights` covers `R x run`, `values` `run x 16V`, `sums` `R x 16V`
    /// (with the strides given).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn value_tile<const R: usize, const V: usize>(
        (sums, padded): (*mut f32, usize),
        (weights, keys): (*const f32, usize),
        values: *const f32,
        run: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        for (row, acc) in acc.iter_mut().enumerate() {
            for (vector, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_loadu_ps(sums.add(row * padded + vector * 16));
            }
        }
        for key in 0..run {
            let mut value = [_mm512_setzero_ps(); V];
            for (vector, value) in value.iter_mut().enumerate() {
                *value = _mm512_loadu_ps(values.add(key * padded + vector * 16));
            }
            for (row, acc) in acc.iter_mut().enumerate() {
                let weight = _mm512_set1_ps(*weights.add(row * keys + key));
                for (acc, &value) in acc.iter_mut().zip(&value) {
                    *acc = _mm512_fmadd_ps(weight, value, *acc);
                }
            }
        }
        for (row, acc) in acc.iter().enumerate() {
            for (vector, &acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(sums.add(row * padded + vector * 16), acc);
            }
        }
    }

    /// One run of keys for `R` rows, all padded columns in tiles of at most [`TILE_VECTORS`].
    ///
    /// # Safety
    /// As [`value_tile`], for all `padded` columns.
    #[target_feature(enable = "avx512f")]
    unsafe fn value_rows<const R: usize>(
        (sums, padded): (*mut f32, usize),
        weights: (*const f32, usize),
        values: *const f32,
        run: usize,
    ) {
        let mut column = 0;
        while column < padded {
            let vectors = ((padded - column) / 16).min(TILE_VECTORS);
            let dst = (sums.add(column), padded);
            let src = values.add(column);
            match vectors {
                3 => value_tile::<R, 3>(dst, weights, src, run),
                2 => value_tile::<R, 2>(dst, weights, src, run),
                _ => value_tile::<R, 1>(dst, weights, src, run),
            }
            column += vectors * 16;
        }
    }

    /// Every row of `weights` (`[inverses.len(), keys]`) times the values (`[keys, padded]`),
    /// summed into `sums` (zeroed, `[rows, padded]`) run by run of keys (each run of values stays
    /// in the L1 cache while every row tile passes), then times its inverse into `out` (rows
    /// `stride` apart, the first `head_dim` columns).
    ///
    /// # Safety
    /// AVX-512 F present; `weights` covers `inverses.len() x keys`, `values` `keys` padded rows
    /// ([`padded_head_dim`]), `sums` `inverses.len()` padded rows, `out` `inverses.len()` rows of
    /// `head_dim` values `stride` apart.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn weighted_values(
        out: *mut f32,
        stride: usize,
        weights: *const f32,
        values: *const f32,
        (inverses, sums): (&[f32], *mut f32),
        (keys, head_dim): (usize, usize),
    ) {
        let (rows, padded) = (inverses.len(), padded_head_dim(head_dim));
        let mut first = 0;
        while first < keys {
            let run = VALUE_RUN.min(keys - first);
            let values = values.add(first * padded);
            let mut row = 0;
            while row < rows {
                let count = (rows - row).min(TILE_ROWS);
                let dst = (sums.add(row * padded), padded);
                let src = (weights.add(row * keys + first), keys);
                with_tile_rows!(count, R => value_rows::<R>(dst, src, values, run));
                row += count;
            }
            first += run;
        }
        for (row, &inverse) in inverses.iter().enumerate() {
            let inverse = _mm512_set1_ps(inverse);
            for column in (0..head_dim).step_by(16) {
                let mask = lanes(head_dim - column);
                let sum = _mm512_loadu_ps(sums.add(row * padded + column));
                let dst = out.add(row * stride + column);
                _mm512_mask_storeu_ps(dst, mask, _mm512_mul_ps(sum, inverse));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_support::values;

    #[test]
    fn scores_match_the_plain_sums() {
        let shapes = [
            (13, 80, 40),
            (8, 48, 7),
            (3, 16, 1),
            (17, 96, 80),
            (9, 77, 40),
            (2, 5, 8),
        ];
        for (rows, keys, head_dim) in shapes {
            if !available(keys) {
                return;
            }
            let (stride, offset) = (head_dim * 3 + 5, 7);
            let query = values(offset + rows * stride, 1);
            let key_t = values(3 + head_dim * keys, 2);
            let mut out = vec![f32::NAN; rows * keys];
            let panels = key_panels(&key_t, 3, (head_dim, keys));
            let panels = panels.expect("key panels");
            let shape = (rows, keys, head_dim);
            assert!(scores(&mut out, (&query, offset, stride), &panels, shape));
            for row in 0..rows {
                for key in 0..keys {
                    let expected: f64 = (0..head_dim)
                        .map(|i| {
                            f64::from(query[offset + row * stride + i])
                                * f64::from(key_t[3 + i * keys + key])
                        })
                        .sum();
                    let got = f64::from(out[row * keys + key]);
                    assert!((got - expected).abs() < 1e-5, "{rows}x{keys}x{head_dim}");
                }
            }
        }
    }

    #[test]
    fn weighted_values_match_the_plain_sums_and_leave_other_columns() {
        let shapes = [
            (13, 64, 40),
            (9, 32, 80),
            (2, 16, 160),
            (5, 48, 3),
            (4, 77, 40),
        ];
        for (rows, keys, head_dim) in shapes {
            if !available(keys) {
                return;
            }
            let padded = padded_head_dim(head_dim);
            let weights: Vec<f32> = values(rows * keys, 3).iter().map(|v| v.abs()).collect();
            let mut value_rows = values(keys * padded, 4);
            for row in value_rows.chunks_exact_mut(padded) {
                row[head_dim..].fill(0.0);
            }
            let inverses: Vec<f32> = (0..rows).map(|row| 1.0 / (row + 2) as f32).collect();
            let (stride, offset) = (head_dim + 9, 4);
            let mut out = vec![-7.0f32; offset + rows * stride];
            let done = weighted_values(
                (&mut out, offset, stride),
                &weights,
                &value_rows,
                &inverses,
                (keys, head_dim),
            );
            assert!(done);
            for (index, &got) in out.iter().enumerate() {
                let Some(local) = index.checked_sub(offset) else {
                    assert_eq!(got, -7.0);
                    continue;
                };
                let (row, column) = (local / stride, local % stride);
                if column >= head_dim || row >= rows {
                    assert_eq!(got, -7.0, "outside the output at {index}");
                    continue;
                }
                let sum: f64 = (0..keys)
                    .map(|key| {
                        f64::from(weights[row * keys + key])
                            * f64::from(value_rows[key * padded + column])
                    })
                    .sum();
                let expected = sum * f64::from(inverses[row]);
                assert!(
                    (f64::from(got) - expected).abs() < 1e-5,
                    "{rows}x{keys}x{head_dim}"
                );
            }
        }
    }

    #[test]
    fn chunks_match_the_softmax_in_f64() {
        // 1000 keys: two whole chunks and a partial one; 37 queries: a group and a partial one.
        // The keys grow along the sequence, so later chunks raise the row maxima (rescaling).
        let (rows, keys, head_dim) = (37, 1000, 40);
        if !chunks_suit(keys) {
            return;
        }
        let padded = padded_head_dim(head_dim);
        let (stride, offset) = (head_dim + 3, 2);
        let query = values(offset + rows * stride, 11);
        let mut key_t = values(head_dim * keys, 12);
        for (index, value) in key_t.iter_mut().enumerate() {
            *value *= 1.0 + 4.0 * (index % keys) as f32 / keys as f32;
        }
        let mut value_rows = values(keys * padded, 13);
        for row in value_rows.chunks_exact_mut(padded) {
            row[head_dim..].fill(0.0);
        }
        let panels = key_panels(&key_t, 0, (head_dim, keys)).expect("key panels");
        let mut out = vec![-7.0f32; rows * head_dim];
        let scale = 0.9;
        let done = attention_in_chunks(
            (&mut out, 0, head_dim),
            (&query, offset, stride),
            (&panels, &value_rows),
            (rows, keys, head_dim),
            scale,
        );
        assert!(done);
        for row in 0..rows {
            let scores: Vec<f64> = (0..keys)
                .map(|key| {
                    let dot: f64 = (0..head_dim)
                        .map(|i| {
                            f64::from(query[offset + row * stride + i])
                                * f64::from(key_t[i * keys + key])
                        })
                        .sum();
                    dot * f64::from(scale)
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|score| (score - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            for column in 0..head_dim {
                let expected: f64 = (0..keys)
                    .map(|key| weights[key] * f64::from(value_rows[key * padded + column]))
                    .sum::<f64>()
                    / total;
                let got = f64::from(out[row * head_dim + column]);
                assert!((got - expected).abs() < 2e-6, "row {row}, column {column}");
            }
        }
    }

    #[test]
    fn exp_rows_are_the_softmax_numerators() {
        // 77 keys: a 64-value chunk and a masked tail.
        let keys = 77;
        if !available(keys) {
            return;
        }
        let mut rows: Vec<f32> = values(3 * keys, 7).iter().map(|v| v * 40.0).collect();
        // Far below the maximum: the smallest weight, not a subnormal one.
        rows[5] = -1.0e6;
        let original = rows.clone();
        let mut sums = [0f32; 3];
        assert!(exp_rows(&mut rows, keys, 0.3, &mut sums));
        for ((row, before), &sum) in rows.chunks(keys).zip(original.chunks(keys)).zip(&sums) {
            let max = before.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut total = 0f64;
            for (&got, &value) in row.iter().zip(before) {
                let exponent = 0.3 * (f64::from(value) - f64::from(max));
                let exact = exponent.exp();
                assert!(got.is_normal(), "{got} from {value}");
                // The polynomial's error, and the rounding of the f32 exponent (relative to it).
                let bound = (2e-7 + 1.2e-7 * exponent.abs()) * exact + 1.2e-38;
                let error = (f64::from(got) - exact).abs();
                assert!(error <= bound, "{got} for {exact}");
                total += f64::from(got);
            }
            assert!((f64::from(sum) - total).abs() < 1e-6 * total);
        }
    }

    #[test]
    fn probabilities_are_added_to_the_mean() {
        let keys = 37;
        if !available(keys) {
            return;
        }
        let exps: Vec<f32> = values(2 * keys, 8).iter().map(|v| v.abs()).collect();
        let sums = [3.0f32, 0.5];
        let mut mean = values(2 * keys, 9);
        let before = mean.clone();
        assert!(add_probabilities(&mut mean, &exps, &sums, 0.25));
        for (index, (&got, &old)) in mean.iter().zip(&before).enumerate() {
            let expected = old + exps[index] * (0.25 / sums[index / keys]);
            assert_eq!(got, expected, "at {index}");
        }
        // Sizes that do not match.
        assert!(!add_probabilities(&mut mean[1..], &exps, &sums, 0.25));
    }

    #[test]
    fn unsuited_shapes_write_nothing() {
        let query = values(8 * 4, 5);
        let key_t = values(4 * 20, 6);
        // No keys; a key view past its slice.
        assert!(key_panels(&key_t, 0, (4, 0)).is_none());
        assert!(key_panels(&key_t, 1, (4, 20)).is_none());
        let mut out = vec![1.0f32; 8 * 16];
        // A query view past its slice.
        assert!(!scores(&mut out, (&query, 1, 4), &key_t[..64], (8, 16, 4)));
        // Panels of the wrong length (20 keys take 32 padded columns).
        let mut out = vec![1.0f32; 8 * 20];
        assert!(!scores(&mut out, (&query, 0, 4), &key_t[..80], (8, 20, 4)));
        assert!(out.iter().all(|&value| value == 1.0));
    }
}

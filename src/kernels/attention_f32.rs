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
//! Without a head mean to add, many keys go another way ([`attention_by_query_lanes`]): the
//! queries lie along the vector lanes, 48 at a time, and pass over the keys 128 at a time with
//! the online softmax (running maxima per lane; the earlier sums rescaled when a maximum grows).
//! A chunk's scores stay in the L1 cache, the lane-wise maxima and sums need no reductions across
//! a vector, and neither product pads `d` to whole vectors.
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

/// Queries per group of [`attention_by_query_lanes`]: the lanes of three vectors.
const LANE_QUERIES: usize = TILE_VECTORS * 16;

/// Keys per chunk of [`attention_by_query_lanes`]: a chunk's `[keys, 48]` weights (24 KiB) stay
/// in the L1 cache from their product to the product with the values.
const LANE_CHUNK_KEYS: usize = 128;

/// Keys per tile of [`lane_keys`], and values of a key per tile of the product with the values:
/// the rows of one register tile.
const LANE_TILE: usize = TILE_ROWS;

/// Fewest keys for [`attention_by_query_lanes`]: fewer go through a block of scores. One layer of
/// 2 x 8 heads of 40, 4096 queries and keys, two threads: see `docs/benchmarks.md`.
const LANES_MIN_KEYS: usize = 481;

/// A thread's buffers for [`attention_by_query_lanes`]: a group's queries transposed
/// (`[d, 48]`), a chunk's weights (`[LANE_CHUNK_KEYS, 48]`) and the transposed output sums
/// (`[d, 48]`).
#[derive(Default)]
pub(super) struct LaneScratch {
    query_t: Vec<f32>,
    weights: Vec<f32>,
    sums_t: Vec<f32>,
}

thread_local! {
    /// Each thread's [`LaneScratch`].
    static LANES: std::cell::Cell<LaneScratch> = std::cell::Cell::new(LaneScratch::default());
}

/// Whether [`attention_by_query_lanes`] suits `keys` keys: at least [`LANES_MIN_KEYS`], unless
/// the environment variable `ATTEND_NO_ATTENTION_CHUNKS` is set (then every f32 fused attention
/// keeps a block of scores, for comparisons).
pub(super) fn lanes_suit(keys: usize) -> bool {
    static WANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let wanted = *WANTED.get_or_init(|| std::env::var_os("ATTEND_NO_ATTENTION_CHUNKS").is_none());
    wanted && keys >= LANES_MIN_KEYS && available(keys)
}

/// Values in a head's [`lane_keys`]: whole tiles of 8 keys of `d` values each.
fn lane_keys_len(head_dim: usize, keys: usize) -> usize {
    keys.div_ceil(LANE_TILE) * LANE_TILE * head_dim
}

/// A head's transposed keys `key_t[offset..]` (`[d, keys]`, rows `keys` apart) into `tiles` as
/// tiles of 8 keys for [`attention_by_query_lanes`], each `[d, 8]` (the last one padded with
/// zero keys); `false` (nothing written) where [`available`] is not or the view does not fit its
/// slice.
pub(super) fn lane_keys(
    tiles: &mut Vec<f32>,
    key_t: &[f32],
    offset: usize,
    (head_dim, keys): (usize, usize),
) -> bool {
    if !available(keys) || !fits(key_t.len(), offset, (head_dim, keys), keys) {
        return false;
    }
    tiles.clear();
    tiles.resize(lane_keys_len(head_dim, keys), 0.0);
    for (tile, first) in (0..keys).step_by(LANE_TILE).enumerate() {
        let width = LANE_TILE.min(keys - first);
        let dst = &mut tiles[tile * LANE_TILE * head_dim..][..LANE_TILE * head_dim];
        for (row, dst) in dst.chunks_exact_mut(LANE_TILE).enumerate() {
            let src = &key_t[offset + row * keys + first..][..width];
            // Whole tiles as arrays: a call to copy eight values costs more than the copy.
            match (
                <&mut [f32; LANE_TILE]>::try_from(&mut *dst),
                <&[f32; LANE_TILE]>::try_from(src),
            ) {
                (Ok(dst), Ok(src)) => *dst = *src,
                _ => dst[..width].copy_from_slice(src),
            }
        }
    }
    true
}

/// `out[offset + r * stride..][..head_dim] = softmax(scale * q_r k^T) v` for `rows` query rows
/// (`query[query_offset + r * query_stride..]`), the keys given as their [`lane_keys`] and the
/// values as `keys` rows of `d` (`value[value_offset + k * value_stride..]`), without a block of scores and with the queries along the
/// vector lanes: a group of 48 queries (transposed once) passes over the keys chunk by chunk,
/// each chunk's scores computed as `[keys, 48]` (8 keys broadcast against the queries' three
/// vectors), their maxima, exponentials and sums taken lane by lane against running maxima (the
/// online softmax), and the transposed outputs `[d, 48]` summed from them (8 of a key's values
/// broadcast against its weights). Neither product pads `d` to whole vectors. `false` (nothing
/// written) when [`available`] is not or a view does not fit its slice.
pub(super) fn attention_by_query_lanes(
    (out, offset, stride): (&mut [f32], usize, usize),
    (query, query_offset, query_stride): (&[f32], usize, usize),
    (key_tiles, (value, value_offset, value_stride)): (&[f32], (&[f32], usize, usize)),
    (rows, keys, head_dim): (usize, usize, usize),
    scale: f32,
) -> bool {
    if !available(keys)
        || head_dim == 0
        || key_tiles.len() != lane_keys_len(head_dim, keys)
        || !fits(value.len(), value_offset, (keys, head_dim), value_stride)
        || !fits(query.len(), query_offset, (rows, head_dim), query_stride)
        || !fits(out.len(), offset, (rows, head_dim), stride)
    {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let mut scratch = LANES.take();
        #[allow(unsafe_code)]
        // SAFETY: AVX-512 F is present (`available`); every view was checked to lie inside its
        // slice above; the scratch buffers are sized inside.
        unsafe {
            x86::attention_by_query_lanes(
                (out.as_mut_ptr().add(offset), stride),
                (query.as_ptr().add(query_offset), query_stride),
                (
                    key_tiles.as_ptr(),
                    (value.as_ptr().add(value_offset), value_stride),
                ),
                (rows, keys, head_dim),
                scale,
                &mut scratch,
            );
        }
        LANES.set(scratch);
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (out, query, key_tiles, value, scale);
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
        padded_head_dim, LaneScratch, LANE_CHUNK_KEYS, LANE_QUERIES, LANE_TILE, PANEL_KEYS,
        TILE_ROWS, TILE_VECTORS, VALUE_RUN,
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

    /// See [`super::attention_by_query_lanes`].
    ///
    /// # Safety
    /// AVX-512 F present; `out` covers `rows` rows of `head_dim` values `stride` apart, `query`
    /// `rows` rows of `head_dim` values `query_stride` apart, `key_tiles` the keys' tiles
    /// ([`super::lane_keys`]) and `values` `keys` rows of `head_dim` values `value_stride` apart.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn attention_by_query_lanes(
        (out, stride): (*mut f32, usize),
        (query, query_stride): (*const f32, usize),
        (key_tiles, (values, value_stride)): (*const f32, (*const f32, usize)),
        (rows, keys, head_dim): (usize, usize, usize),
        scale: f32,
        scratch: &mut LaneScratch,
    ) {
        const V: usize = TILE_VECTORS;
        let slope = scale * std::f32::consts::LOG2_E;
        let LaneScratch {
            query_t,
            weights,
            sums_t,
        } = scratch;
        query_t.resize(head_dim * LANE_QUERIES, 0.0);
        // Whole tiles of keys: a partial chunk's last tile writes rows past its keys.
        weights.resize((LANE_CHUNK_KEYS + LANE_TILE) * LANE_QUERIES, 0.0);
        sums_t.resize(head_dim * LANE_QUERIES, 0.0);
        let mut first_row = 0;
        while first_row < rows {
            let group = LANE_QUERIES.min(rows - first_row);
            // The group's queries, transposed and scaled to base-2 exponents; missing queries
            // are zeros (their lanes are computed and never stored).
            query_t.fill(0.0);
            for q in 0..group {
                let row = query.add((first_row + q) * query_stride);
                for i in 0..head_dim {
                    query_t[i * LANE_QUERIES + q] = *row.add(i) * slope;
                }
            }
            sums_t.fill(0.0);
            let mut maxima = [_mm512_set1_ps(f32::NEG_INFINITY); V];
            let mut totals = [_mm512_setzero_ps(); V];
            let mut first_key = 0;
            while first_key < keys {
                let chunk = LANE_CHUNK_KEYS.min(keys - first_key);
                let at = weights.as_mut_ptr();
                // The chunk's scores, tile by tile, and the lanes' new maxima (over its keys).
                let mut chunk_max = maxima;
                let mut key = 0;
                while key < chunk {
                    let tile = key_tiles.add((first_key + key) * head_dim);
                    let valid = (chunk - key).min(LANE_TILE);
                    let dst = at.add(key * LANE_QUERIES);
                    lane_scores(dst, query_t.as_ptr(), tile, head_dim, valid, &mut chunk_max);
                    key += LANE_TILE;
                }
                // The earlier sums' rescaling, the exponentials and their sums.
                let mut rescale = [_mm512_setzero_ps(); V];
                for (rescale, (&old, &new)) in rescale.iter_mut().zip(maxima.iter().zip(&chunk_max))
                {
                    *rescale = exp2(_mm512_sub_ps(old, new));
                }
                let mut chunk_sums = [_mm512_setzero_ps(); V];
                for key in 0..chunk {
                    let lanes = chunk_sums.iter_mut().zip(&chunk_max).enumerate();
                    for (vector, (sum, &max)) in lanes {
                        let at = at.add(key * LANE_QUERIES + vector * 16);
                        let e = exp2(_mm512_sub_ps(_mm512_loadu_ps(at), max));
                        *sum = _mm512_add_ps(*sum, e);
                        _mm512_storeu_ps(at, e);
                    }
                }
                for ((total, &rescale), &sum) in totals.iter_mut().zip(&rescale).zip(&chunk_sums) {
                    *total = _mm512_fmadd_ps(*total, rescale, sum);
                }
                maxima = chunk_max;
                let mut column = 0;
                while column < head_dim {
                    let count = (head_dim - column).min(LANE_TILE);
                    let sums = sums_t.as_mut_ptr().add(column * LANE_QUERIES);
                    let src = (values.add(first_key * value_stride + column), value_stride);
                    let weights = (at.cast_const(), chunk);
                    with_tile_rows!(count, R => lane_products::<R>(sums, rescale, weights, src));
                    column += count;
                }
                first_key += chunk;
            }
            // Each query's outputs: its lane of the transposed sums over its total.
            let mut inverses = [0f32; LANE_QUERIES];
            for (vector, &total) in totals.iter().enumerate() {
                let inverse = _mm512_div_ps(_mm512_set1_ps(1.0), total);
                _mm512_storeu_ps(inverses.as_mut_ptr().add(vector * 16), inverse);
            }
            for (q, &inverse) in inverses.iter().enumerate().take(group) {
                let dst = out.add((first_row + q) * stride);
                for column in 0..head_dim {
                    *dst.add(column) = sums_t[column * LANE_QUERIES + q] * inverse;
                }
            }
            first_row += group;
        }
    }

    /// Scores of a tile of 8 keys (`[head_dim, 8]`) by the 48 queries of a transposed group
    /// (`[head_dim, 48]`) into 8 rows of 48 lanes at `dst`; `maxima` takes the lanes' maxima
    /// over the first `valid` keys.
    ///
    /// # Safety
    /// AVX-512 F present; the pointers cover `head_dim x 8`, `head_dim x 48` and `8 x 48`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn lane_scores(
        dst: *mut f32,
        query_t: *const f32,
        tile: *const f32,
        head_dim: usize,
        valid: usize,
        maxima: &mut [__m512; TILE_VECTORS],
    ) {
        const V: usize = TILE_VECTORS;
        let mut acc = [[_mm512_setzero_ps(); V]; LANE_TILE];
        accumulate(
            &mut acc,
            (tile, 1, LANE_TILE),
            (query_t, LANE_QUERIES),
            head_dim,
        );
        store_rows(&acc, dst, LANE_QUERIES);
        for acc in acc.iter().take(valid) {
            for (max, &acc) in maxima.iter_mut().zip(acc) {
                *max = _mm512_max_ps(*max, acc);
            }
        }
    }

    /// Adds to `R` transposed output rows (`sums`, `R x 48`, first multiplied by `rescale`) the
    /// weighted sum over a chunk's keys (`weights`, `[chunk, 48]`) of `R` adjacent columns of the
    /// values (`values`, rows `value_stride` apart).
    ///
    /// # Safety
    /// AVX-512 F present; `sums` covers `R x 48`, `weights` `chunk x 48`, `values` `chunk` rows
    /// of at least `R` values, `value_stride` apart.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn lane_products<const R: usize>(
        sums: *mut f32,
        rescale: [__m512; TILE_VECTORS],
        (weights, chunk): (*const f32, usize),
        (values, value_stride): (*const f32, usize),
    ) {
        const V: usize = TILE_VECTORS;
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        for (column, acc) in acc.iter_mut().enumerate() {
            for (vector, acc) in acc.iter_mut().enumerate() {
                let at = sums.add(column * LANE_QUERIES + vector * 16);
                *acc = _mm512_mul_ps(_mm512_loadu_ps(at), rescale[vector]);
            }
        }
        accumulate(
            &mut acc,
            (values, 1, value_stride),
            (weights, LANE_QUERIES),
            chunk,
        );
        store_rows(&acc, sums, LANE_QUERIES);
    }

    /// The register tiles' common loop: `acc[r][v] += sum_k a[r * a_row + k * a_step] * b[k *
    /// b_step + 16 v..][..16]` over `depth` steps (each `a` value broadcast, each `b` vector
    /// loaded once per step for all `R` rows).
    ///
    /// # Safety
    /// AVX-512 F present; the pointers cover every element the sums read.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn accumulate<const R: usize, const V: usize>(
        acc: &mut [[__m512; V]; R],
        (a, a_row, a_step): (*const f32, usize, usize),
        (b, b_step): (*const f32, usize),
        depth: usize,
    ) {
        let (mut a_at, mut b_at) = (a, b);
        for _ in 0..depth {
            let mut vectors = [_mm512_setzero_ps(); V];
            for (vector, loaded) in vectors.iter_mut().enumerate() {
                *loaded = _mm512_loadu_ps(b_at.add(vector * 16));
            }
            for (row, acc) in acc.iter_mut().enumerate() {
                let value = _mm512_set1_ps(*a_at.add(row * a_row));
                for (acc, &vector) in acc.iter_mut().zip(&vectors) {
                    *acc = _mm512_fmadd_ps(value, vector, *acc);
                }
            }
            a_at = a_at.add(a_step);
            b_at = b_at.add(b_step);
        }
    }

    /// Stores a register tile: row `r`'s vectors at `dst + r * row_stride`, side by side.
    ///
    /// # Safety
    /// AVX-512 F present; `dst` covers `R` rows of `16V` values, `row_stride` apart.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn store_rows<const R: usize, const V: usize>(
        acc: &[[__m512; V]; R],
        dst: *mut f32,
        row_stride: usize,
    ) {
        for (row, acc) in acc.iter().enumerate() {
            for (vector, &acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(dst.add(row * row_stride + vector * 16), acc);
            }
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
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        accumulate(
            &mut acc,
            (query, query_stride, 1),
            (panel, V * 16),
            head_dim,
        );
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
        accumulate(&mut acc, (weights, keys, 1), (values, padded), run);
        store_rows(&acc, sums, padded);
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
    fn query_lanes_match_the_softmax_in_f64() {
        // 1003 keys: seven whole chunks of 128 and a partial one ending in a partial tile of 8;
        // 61 queries: a group of 48 and a partial one; heads of 40 (five tiles of 8 values) and
        // 13 (a partial tile). The keys grow along the sequence, so later chunks raise the lanes'
        // maxima (rescaling).
        let (rows, keys) = (61, 1003);
        if !lanes_suit(keys) {
            return;
        }
        for head_dim in [40, 13] {
            let (stride, offset) = (head_dim + 3, 2);
            let query = values(offset + rows * stride, 11);
            let mut key_t = values(head_dim * keys, 12);
            for (index, value) in key_t.iter_mut().enumerate() {
                *value *= 1.0 + 4.0 * (index % keys) as f32 / keys as f32;
            }
            let (value_stride, value_offset) = (head_dim + 5, 3);
            let value = values(value_offset + keys * value_stride, 13);
            let mut tiles = vec![7.0f32; 3];
            assert!(lane_keys(&mut tiles, &key_t, 0, (head_dim, keys)));
            let (out_stride, out_offset) = (head_dim + 2, 1);
            let mut out = vec![-7.0f32; out_offset + rows * out_stride];
            let scale = 0.9;
            assert!(attention_by_query_lanes(
                (&mut out, out_offset, out_stride),
                (&query, offset, stride),
                (&tiles, (&value, value_offset, value_stride)),
                (rows, keys, head_dim),
                scale,
            ));
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
                        .map(|key| {
                            let at = value_offset + key * value_stride + column;
                            weights[key] * f64::from(value[at])
                        })
                        .sum::<f64>()
                        / total;
                    let got = f64::from(out[out_offset + row * out_stride + column]);
                    assert!(
                        (got - expected).abs() < 2e-6,
                        "d {head_dim}, row {row}, column {column}: {got} against {expected}"
                    );
                }
                // The columns between rows are left as they were.
                let gap = out_offset + row * out_stride + head_dim;
                assert_eq!(out[gap..gap + 2], [-7.0, -7.0]);
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
        // Query lanes: a key view past its slice; tiles of the wrong length; values past their
        // slice.
        let mut tiles = Vec::new();
        assert!(!lane_keys(&mut tiles, &key_t, 1, (4, 20)));
        assert!(lane_keys(&mut tiles, &key_t, 0, (4, 20)));
        let value = values(20 * 4, 7);
        let mut out = vec![1.0f32; 8 * 4];
        let shape = (8, 20, 4);
        let lanes = |out: &mut [f32], tiles: &[f32], value: &[f32]| {
            let operands = (tiles, (value, 0, 4));
            attention_by_query_lanes((out, 0, 4), (&query, 0, 4), operands, shape, 1.0)
        };
        assert!(!lanes(&mut out, &tiles[1..], &value));
        assert!(!lanes(&mut out, &tiles, &value[1..]));
        assert!(out.iter().all(|&value| value == 1.0));
        assert!(lanes(&mut out, &tiles, &value));
    }
}

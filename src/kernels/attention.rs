//! Attention kernels on per-head strided views (no head split/merge copies): fused attention
//! `softmax(scale * q k^T) v` in cache-sized query blocks, the probabilities alone and their
//! product with the values (for layers whose probabilities a processor reads), and the mean of
//! planes (the head mean of probabilities).

use std::sync::OnceLock;

use candle_core::{Result, Tensor};

use super::attention_f32;
use super::bf16::{gemm_bf16_packed, product_precision, PackedRhs};
use super::buffers::{parallel_filled, parallel_row_blocks, zeroed};
use super::gemm::gemm_bf16_packed_rhs;
use super::gemm::{gemm_single_thread, gemm_uninit, MatrixView};
use super::heads::check_heads;
use super::operands::{f32_operand, with_f32_pair, with_values};
use super::softmax::{
    ExpRowsToBf16, ExpsToMeanAndBf16, SoftmaxRows, UnnormalisedSoftmaxRows,
    UnnormalisedSoftmaxRowsForBf16,
};
use super::softmax_bf16::{exp_rows_to_bf16, ScoreRows};
use super::threads::{for_each_block, parallel_map};

/// Score elements (`queries x keys`) one attention block keeps at once (2 MiB, about one core's
/// L2 cache; 128 queries at 4096 keys). Measured on the SD 1.5 64x64 self-attention: 64 Ki
/// elements 311 ms, 256 Ki 241 ms, 512 Ki 221 ms, 1 Mi 218 ms per layer.
const ATTENTION_BLOCK_SCORES: usize = 512 * 1024;

thread_local! {
    /// Each thread's block of attention scores, kept between fused attention calls.
    static SCORES: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    /// Each thread's keys as the tiles of `attention_f32::lane_keys`, kept between units.
    static KEY_TILES: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    /// Each thread's values of one head as contiguous rows, kept between units.
    static VALUE_ROWS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    /// Each thread's block of bf16 exponentials (as pairs), with bf16 products.
    static HALVES: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Score elements of one fused attention block with bf16 products (256 KiB: the block, its bf16
/// exponentials and an observed block's head mean stay in a core's 1 MiB L2 cache; the keys and
/// values are packed once per unit, so small blocks cost no repacking).
const BF16_ATTENTION_BLOCK_SCORES: usize = 64 * 1024;

/// Query rows per attention block: [`ATTENTION_BLOCK_SCORES`] scores, at least 8 rows.
fn attention_block_rows(queries: usize, keys: usize) -> usize {
    (ATTENTION_BLOCK_SCORES / keys.max(1)).clamp(8, queries.max(8))
}

/// Query rows per fused attention block at the calling thread's product precision.
fn fused_block_rows(queries: usize, keys: usize) -> usize {
    if product_precision().uses_bf16_here() {
        (BF16_ATTENTION_BLOCK_SCORES / keys.max(1)).clamp(8, queries.max(8))
    } else {
        attention_block_rows(queries, keys)
    }
}

/// Fused multi-head attention `softmax(scale * q k^T) v` for f32 activations, without head
/// split/merge copies: blocks of queries (with all their heads) are spread over the cores and each
/// block runs its two products single-threaded on strided head views, with the block's scores
/// kept cache-sized.
struct FusedAttention<'a> {
    /// `[batch, queries, heads * d]`.
    query: &'a [f32],
    /// `[batch * heads, d, keys]`.
    key_t: &'a [f32],
    /// `[batch, keys, heads * d]`.
    value: &'a [f32],
    batch: usize,
    queries: usize,
    keys: usize,
    heads: usize,
    head_dim: usize,
    scale: f32,
    /// The batch item whose probabilities, averaged over heads, are also added to a sum (see
    /// [`fused_attention_adding_head_mean`]).
    observed_item: Option<usize>,
}

/// What one worker of [`FusedAttention`] computes.
#[derive(Clone, Copy)]
enum FusedUnit {
    /// All queries of one head of one batch item: `[queries, d]`.
    Head { item: usize, head: usize },
    /// Queries `first..first + rows` of the observed item, all heads: `[rows, heads * d]`, with
    /// the block's head mean of the probabilities added to rows `first..first + rows` of the sum.
    /// `part` is the block's index among the observed blocks.
    Observed {
        first: usize,
        rows: usize,
        part: usize,
    },
}

/// A unit's results: its outputs `[queries, d]` (a head) or `[rows, heads * d]` (an observed
/// block).
struct FusedResult(Vec<f32>);

impl FusedAttention<'_> {
    fn inner(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Where head `head` of batch item `item` starts in `key_t` (`[d, keys]`).
    fn key_t_offset(&self, item: usize, head: usize) -> usize {
        (item * self.heads + head) * self.head_dim * self.keys
    }

    /// Where head `head` of batch item `item` starts in `value` (rows of `inner`).
    fn value_offset(&self, item: usize, head: usize) -> usize {
        item * self.keys * self.inner() + head * self.head_dim
    }

    /// `values` = head `head` of batch item `item`'s values as `keys` contiguous rows of
    /// `row_len` (at least `d`; the padding zero).
    fn copy_head_values(&self, item: usize, head: usize, row_len: usize, values: &mut Vec<f32>) {
        let (inner, head_dim, value_offset) =
            (self.inner(), self.head_dim, self.value_offset(item, head));
        values.clear();
        values.resize(self.keys * row_len, 0.0);
        for (key, row) in values.chunks_exact_mut(row_len).enumerate() {
            row[..head_dim].copy_from_slice(&self.value[value_offset + key * inner..][..head_dim]);
        }
    }

    /// The output `[batch, queries, heads * d]`; with an observed item, its head mean of the
    /// probabilities is added to `head_mean_sum` `[queries, keys]`.
    fn run(&self, head_mean_sum: Option<&mut [f32]>) -> Result<Vec<f32>> {
        let (batch, queries, keys, inner) = (self.batch, self.queries, self.keys, self.inner());
        if self.key_t.len() != batch * inner * keys
            || self.value.len() != batch * keys * inner
            || self.query.len() != batch * queries * inner
        {
            candle_core::bail!("fused attention: inconsistent shapes");
        }
        if let Some(item) = self.observed_item.filter(|&item| item >= batch) {
            candle_core::bail!("fused attention: observed item {item} outside a batch of {batch}");
        }
        let head_mean_sum = match (self.observed_item, head_mean_sum) {
            (None, None) => None,
            (Some(_), Some(sum)) if sum.len() == queries * keys => Some(sum),
            (Some(_), Some(sum)) => candle_core::bail!(
                "fused attention: a head mean sum of {} values for {queries} queries x {keys} keys",
                sum.len()
            ),
            _ => candle_core::bail!("fused attention: an observed item needs its head mean sum"),
        };
        let head_dim = self.head_dim;
        // The observed item goes in blocks of queries with all their heads (each block sums its
        // own rows of the head mean, so no two workers write the same values), cut so that a
        // block costs about one head of another item; the other items go one unit per (item,
        // head): its keys and values stay in the core's cache while all its query blocks pass.
        let mut units = Vec::with_capacity(batch * self.heads + self.heads);
        // Each observed block's rows of the head mean sum, taken by the block's unit.
        let mut mean_parts: Vec<std::sync::Mutex<Option<&mut [f32]>>> = Vec::new();
        if let Some(sum) = head_mean_sum {
            let rows = queries.div_ceil(self.heads);
            for (part, rows_sum) in sum.chunks_mut(rows * keys.max(1)).enumerate() {
                let first = part * rows;
                let count = rows.min(queries - first);
                units.push(FusedUnit::Observed {
                    first,
                    rows: count,
                    part,
                });
                mean_parts.push(std::sync::Mutex::new(Some(rows_sum)));
            }
        }
        for item in (0..batch).filter(|&item| Some(item) != self.observed_item) {
            units.extend((0..self.heads).map(|head| FusedUnit::Head { item, head }));
        }
        // The observed item's keys and values, per head, prepared once by whichever of its units
        // needs them first and then shared by all of them.
        let observed_operands: Vec<OnceLock<HeadValues>> =
            (0..self.heads).map(|_| OnceLock::new()).collect();
        let results = parallel_map(
            units.len(),
            batch * queries * keys >= 4096,
            |index| match units[index] {
                FusedUnit::Head { item, head } => self.head_unit(item, head).map(FusedResult),
                FusedUnit::Observed { first, rows, part } => {
                    let rows_sum = mean_parts[part]
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .take();
                    match rows_sum {
                        Some(rows_sum) => self
                            .observed_unit(first, rows, &observed_operands, rows_sum)
                            .map(FusedResult),
                        None => candle_core::bail!("fused attention: a block's head mean taken"),
                    }
                }
            },
        );
        let results = results.into_iter().collect::<Result<Vec<_>>>()?;
        // Where each `(item, head)`'s rows are: a head unit's `[queries, d]`, or the observed
        // blocks' `[rows, inner]` (as `(first row, values)`).
        let mut head_units: Vec<Option<&Vec<f32>>> = vec![None; batch * self.heads];
        let mut observed_blocks: Vec<(usize, &Vec<f32>)> = Vec::new();
        for (unit, FusedResult(local)) in units.iter().zip(&results) {
            match *unit {
                FusedUnit::Head { item, head } => {
                    head_units[item * self.heads + head] = Some(local)
                }
                FusedUnit::Observed { first, .. } => observed_blocks.push((first, local)),
            }
        }
        let observed_item = self.observed_item;
        // Rows `(item, query)` gather each head's `d` outputs from its unit.
        let out = parallel_filled(batch * queries * inner, batch * queries, |first, piece| {
            for (offset, dst) in piece.chunks_exact_mut(inner).enumerate() {
                let (item, query) = ((first + offset) / queries, (first + offset) % queries);
                if Some(item) == observed_item {
                    dst.copy_from_slice(block_row(&observed_blocks, query, inner));
                    continue;
                }
                for (head, dst_head) in dst.chunks_exact_mut(head_dim).enumerate() {
                    if let Some(local) = head_units[item * self.heads + head] {
                        dst_head.copy_from_slice(&local[query * head_dim..][..head_dim]);
                    }
                }
            }
        });
        Ok(out)
    }

    /// Every query of batch item `item`, head `head`, in cache-sized blocks: `[queries, d]`.
    fn head_unit(&self, item: usize, head: usize) -> Result<Vec<f32>> {
        let (queries, keys, head_dim) = (self.queries, self.keys, self.head_dim);
        if !product_precision().uses_bf16_here() && attention_f32::lanes_suit(keys) {
            return self.head_unit_by_query_lanes(item, head);
        }
        let block_rows = fused_block_rows(queries, keys);
        // The scores block is written by its product before it is read: a per-thread buffer
        // kept between calls (a fresh 2 MiB block was zeroed for every unit).
        let mut scores = SCORES.take();
        if scores.len() < block_rows.min(queries) * keys {
            scores.resize(block_rows.min(queries) * keys, 0.0);
        }
        let mut sums = vec![0f32; block_rows.min(queries)];
        let mut local = vec![0f32; queries * head_dim];
        let values = self.head_values(item, head);
        let done = for_each_block(0, queries, queries, block_rows, |first, rows, _| {
            let block = Block {
                first,
                rows,
                scores: &mut scores[..rows * keys],
                sums: &mut sums[..rows],
            };
            self.block(
                item,
                head,
                &values,
                block,
                (&mut local, 0, head_dim, 0),
                None,
            )
        });
        SCORES.set(scores);
        done?;
        Ok(local)
    }

    /// [`Self::head_unit`] with f32 products and many keys: all queries at once through
    /// [`attention_f32::attention_by_query_lanes`], the keys as its tiles and the values as
    /// contiguous rows (so a chunk's values stay together in the cache), both in per-thread
    /// buffers kept between units.
    fn head_unit_by_query_lanes(&self, item: usize, head: usize) -> Result<Vec<f32>> {
        let (queries, keys, head_dim, inner) =
            (self.queries, self.keys, self.head_dim, self.inner());
        let key_t_offset = self.key_t_offset(item, head);
        let (mut tiles, mut values) = (KEY_TILES.take(), VALUE_ROWS.take());
        self.copy_head_values(item, head, head_dim, &mut values);
        let mut local = vec![0f32; queries * head_dim];
        let done = attention_f32::lane_keys(&mut tiles, self.key_t, key_t_offset, (head_dim, keys))
            && attention_f32::attention_by_query_lanes(
                (&mut local, 0, head_dim),
                (self.query, item * queries * inner + head * head_dim, inner),
                (&tiles, (&values, 0, head_dim)),
                (queries, keys, head_dim),
                self.scale,
            );
        KEY_TILES.set(tiles);
        VALUE_ROWS.set(values);
        if !done {
            candle_core::bail!("fused attention: the query-lane kernel refused its views");
        }
        Ok(local)
    }

    /// Queries `first..first + rows` of the observed item, every head: the output rows `[rows,
    /// heads * d]`; the block's probabilities averaged over heads are added to `mean` `[rows,
    /// keys]` (each head's, times one over the heads, in head order).
    fn observed_unit(
        &self,
        first: usize,
        rows: usize,
        operands: &[OnceLock<HeadValues>],
        mean: &mut [f32],
    ) -> Result<Vec<f32>> {
        let (keys, inner) = (self.keys, self.inner());
        let item = self.observed_item.unwrap_or(0);
        let block_rows = fused_block_rows(rows, keys).min(rows.max(1));
        let mut scores = SCORES.take();
        if scores.len() < block_rows * keys {
            scores.resize(block_rows * keys, 0.0);
        }
        let mut sums = vec![0f32; block_rows];
        let mut output = vec![0f32; rows * inner];
        let operands: Vec<&HeadValues> = operands
            .iter()
            .enumerate()
            .map(|(head, values)| values.get_or_init(|| self.head_values(item, head)))
            .collect();
        // Sub-blocks of rows, all heads each, so a sub-block's head mean stays in the cache.
        let done = for_each_block(
            first,
            rows,
            usize::MAX,
            block_rows,
            |start, count, local| {
                let mean_rows = &mut mean[local * keys..(local + count) * keys];
                for (head, values) in operands.iter().enumerate() {
                    let block = Block {
                        first: start,
                        rows: count,
                        scores: &mut scores[..count * keys],
                        sums: &mut sums[..count],
                    };
                    let target = (&mut output[..], first, inner, head * self.head_dim);
                    self.block(item, head, values, block, target, Some(&mut *mean_rows))?;
                }
                Ok(())
            },
        );
        SCORES.set(scores);
        done?;
        Ok(output)
    }

    /// Head `head` of batch item `item`'s keys and values for its query blocks: with bf16
    /// products both packed for them (straight from the strided inputs), else the values as a
    /// contiguous `[keys, d]` (read once per query block).
    fn head_values(&self, item: usize, head: usize) -> HeadValues {
        let (keys, inner, head_dim) = (self.keys, self.inner(), self.head_dim);
        let (key_t_offset, value_offset) =
            (self.key_t_offset(item, head), self.value_offset(item, head));
        if product_precision().uses_bf16_here() {
            let key_t = key_t_offset;
            let packed =
                PackedRhs::new(self.key_t, (key_t, keys), (head_dim, keys)).and_then(|key_t| {
                    let values =
                        PackedRhs::new(self.value, (value_offset, inner), (keys, head_dim))?;
                    Some(PackedOperands { key_t, values })
                });
            if packed.is_some() {
                return HeadValues {
                    values: Vec::new(),
                    key_panels: None,
                    packed,
                };
            }
        }
        // Where the f32 kernels of `attention_f32` run: the keys as its panels, the values' rows
        // padded with zeros to whole vectors.
        let key_panels = attention_f32::key_panels(self.key_t, key_t_offset, (head_dim, keys));
        let row_len = if key_panels.is_some() {
            attention_f32::padded_head_dim(head_dim)
        } else {
            head_dim
        };
        let mut values = Vec::new();
        self.copy_head_values(item, head, row_len, &mut values);
        HeadValues {
            values,
            key_panels,
            packed: None,
        }
    }

    /// Queries `block.first..block.first + block.rows` of batch item `item`, head `head`, whose
    /// values are `values`, written to `target` = `(out, out_first, row_stride, column)`: query
    /// `q`'s `d` outputs at `out[(q - out_first) * row_stride + column..]` (a head unit's
    /// `[queries, d]` has `out_first` 0, an observed block's `[rows, inner]` its first query).
    /// With `mean` (`[rows, keys]`), the block's normalised probabilities times one over the
    /// heads are added to it.
    ///
    /// The product with the values takes the unnormalised exponentials (the softmax's division
    /// is applied to the `d` outputs of a row instead of its `keys` weights); with bf16 products
    /// the exponentials are rounded to bf16 as the softmax computes them, already in the
    /// product's packed layout.
    fn block(
        &self,
        item: usize,
        head: usize,
        values: &HeadValues,
        block: Block<'_>,
        (out, out_first, row_stride, column): (&mut [f32], usize, usize, usize),
        mut mean: Option<&mut [f32]>,
    ) -> Result<()> {
        let (keys, inner, head_dim) = (self.keys, self.inner(), self.head_dim);
        let Block {
            first,
            rows,
            scores,
            sums,
        } = block;
        let query_offset = (item * self.queries + first) * inner + head * head_dim;
        let query = MatrixView::new(self.query, query_offset, (rows, head_dim), inner);
        let key_t = MatrixView::new(
            self.key_t,
            self.key_t_offset(item, head),
            (head_dim, keys),
            keys,
        );
        let offset = (first - out_first) * row_stride + column;
        let mean_weight = 1.0 / self.heads as f32;
        match &values.packed {
            Some(packed) => {
                if !gemm_bf16_packed_rhs(&mut *scores, query, &packed.key_t) {
                    candle_core::bail!("fused attention: a bf16 product out of bounds");
                }
                let packed = &packed.values;
                let pairs = packed.pairs();
                let mut lhs = HALVES.take();
                if lhs.len() < rows * pairs {
                    lhs.resize(rows * pairs, 0);
                }
                let halves: &mut [u16] = bytemuck::cast_slice_mut(&mut lhs[..rows * pairs]);
                let (half_stride, scale) = (2 * pairs, self.scale);
                let intrinsics = exp_rows_to_bf16(ScoreRows {
                    scores: &mut *scores,
                    row_len: keys,
                    scale,
                    sums: &mut *sums,
                    halves: &mut *halves,
                    half_stride,
                    mean: mean.as_deref_mut(),
                    mean_weight,
                });
                // Without AVX-512 intrinsics for the rows, the portable kernels.
                match mean {
                    _ if intrinsics => {}
                    Some(mean) => {
                        pulp::Arch::new().dispatch(UnnormalisedSoftmaxRowsForBf16 {
                            piece: &mut *scores,
                            row_len: keys,
                            scale: self.scale,
                            sums: &mut *sums,
                        });
                        pulp::Arch::new().dispatch(ExpsToMeanAndBf16 {
                            exps: scores,
                            row_len: keys,
                            sums,
                            mean,
                            mean_weight,
                            halves,
                            half_stride: 2 * pairs,
                        });
                    }
                    None => pulp::Arch::new().dispatch(ExpRowsToBf16 {
                        scores,
                        row_len: keys,
                        scale,
                        sums: &mut *sums,
                        halves,
                        half_stride,
                    }),
                }
                let done = gemm_bf16_packed(out, (offset, row_stride), &lhs, rows, packed);
                HALVES.set(lhs);
                if !done {
                    candle_core::bail!("fused attention: a bf16 product out of bounds");
                }
            }
            None => {
                let panels = values.key_panels.as_deref();
                let tiled = panels.is_some_and(|panels| {
                    let query = (self.query, query_offset, inner);
                    attention_f32::scores(&mut *scores, query, panels, (rows, keys, head_dim))
                });
                if !tiled {
                    gemm_single_thread(&mut *scores, 0, keys, query, key_t)?;
                }
                // The tiled kernels' own exponentials, else the portable kernel.
                if !(tiled && attention_f32::exp_rows(&mut *scores, keys, self.scale, sums)) {
                    pulp::Arch::new().dispatch(UnnormalisedSoftmaxRows {
                        piece: &mut *scores,
                        row_len: keys,
                        scale: self.scale,
                        sums: &mut *sums,
                    });
                }
                // The head mean: the tiled kernels' own rows, else the plain loop.
                let mean = match mean {
                    Some(mean) if tiled => {
                        let added =
                            attention_f32::add_probabilities(mean, scores, sums, mean_weight);
                        (!added).then_some(mean)
                    }
                    mean => mean,
                };
                if let Some(mean) = mean {
                    let exponentials = scores.chunks_exact(keys);
                    let mean_rows = mean.chunks_exact_mut(keys).zip(exponentials);
                    for ((sum_row, row), &sum) in mean_rows.zip(sums.iter()) {
                        let inverse = mean_weight / sum;
                        for (total, &value) in sum_row.iter_mut().zip(row) {
                            *total += value * inverse;
                        }
                    }
                }
                if values.key_panels.is_some() {
                    // The products with the values, each row divided by its sum as it is stored.
                    for sum in sums.iter_mut() {
                        *sum = 1.0 / *sum;
                    }
                    let target = (&mut *out, offset, row_stride);
                    if !attention_f32::weighted_values(
                        target,
                        scores,
                        &values.values,
                        sums,
                        (keys, head_dim),
                    ) {
                        candle_core::bail!("fused attention: a padded values product refused");
                    }
                    return Ok(());
                }
                let weights = MatrixView::new(scores, 0, (rows, keys), keys);
                let value = MatrixView::new(&values.values, 0, (keys, head_dim), head_dim);
                gemm_single_thread(out, offset, row_stride, weights, value)?;
            }
        }
        // The softmax's division, applied to the `d` outputs of a row.
        for (row, &sum) in sums.iter().enumerate() {
            let inverse = 1.0 / sum;
            for value in &mut out[offset + row * row_stride..][..head_dim] {
                *value *= inverse;
            }
        }
        Ok(())
    }
}

/// Row `row` (`row_len` values) of blocks of rows given as `(first row, values)` in row order,
/// which together hold every row: the row of the last block starting at or before it.
fn block_row<'a>(blocks: &[(usize, &'a Vec<f32>)], row: usize, row_len: usize) -> &'a [f32] {
    let block = blocks.partition_point(|(start, _)| *start <= row);
    let (start, values) = blocks[block - 1];
    &values[(row - start) * row_len..][..row_len]
}

/// One head's operands for the value product, once per unit (for all its query blocks).
struct HeadValues {
    /// The values `[keys, d]` for f32 products (empty when `packed`); `[keys, padded d]`
    /// (`attention_f32::padded_head_dim`) with `key_panels`.
    values: Vec<f32>,
    /// Where `attention_f32`'s kernels run, the transposed keys as its panels.
    key_panels: Option<Vec<f32>>,
    /// With bf16 products, the keys and values packed for them.
    packed: Option<PackedOperands>,
}

/// A head's transposed keys (`[d, keys]`) and values (`[keys, d]`) packed for bf16 products.
struct PackedOperands {
    key_t: PackedRhs,
    values: PackedRhs,
}

/// One block of queries of [`FusedAttention`] with its scratch space.
struct Block<'a> {
    first: usize,
    rows: usize,
    /// `[rows, keys]`.
    scores: &'a mut [f32],
    /// `[rows]`: the softmax denominators.
    sums: &'a mut [f32],
}

/// Attention probabilities `softmax(scale * q k^T)` per head (f32): `query` `[batch, queries,
/// heads * d]`, `key_t` `[batch * heads, d, keys]` -> `[batch * heads, queries, keys]`. The
/// products run in cache-sized blocks spread over the cores (no head split copy of `query`).
pub fn attention_probabilities(
    query: &Tensor,
    key_t: &Tensor,
    heads: usize,
    scale: f32,
) -> Result<Tensor> {
    let (batch, queries, inner) = query.dims3()?;
    let (batch_heads, head_dim, keys) = key_t.dims3()?;
    check_heads(inner, heads)?;
    if batch_heads != batch * heads || head_dim * heads != inner {
        candle_core::bail!(
            "attention probabilities: query {:?} and key_t {:?} do not match {heads} heads",
            query.dims(),
            key_t.dims()
        );
    }
    let block_rows = attention_block_rows(queries, keys);
    let out = with_f32_pair(query, key_t, |query, key_t| {
        parallel_row_blocks(
            batch_heads * queries,
            keys,
            queries,
            block_rows,
            |global, slots| {
                let rows = slots.len() / keys.max(1);
                let (batch_head, query_index) = (global / queries, global % queries);
                let (item, head) = (batch_head / heads, batch_head % heads);
                let lhs = MatrixView::new(
                    query,
                    (item * queries + query_index) * inner + head * head_dim,
                    (rows, head_dim),
                    inner,
                );
                let rhs =
                    MatrixView::new(key_t, batch_head * head_dim * keys, (head_dim, keys), keys);
                let scores = gemm_uninit(slots, lhs, rhs)?;
                pulp::Arch::new().dispatch(SoftmaxRows {
                    piece: &mut *scores,
                    row_len: keys,
                    scale,
                });
                Ok(scores)
            },
        )
    })?;
    Tensor::from_vec(out, (batch_heads, queries, keys), query.device())
}

/// `probabilities v` per head, heads merged (f32 in, `value`'s dtype out): `probabilities`
/// `[batch * heads, queries, keys]`, `value` `[batch, keys, heads * d]` -> `[batch, queries,
/// heads * d]`, in blocks of queries spread over the cores (no head split/merge copies).
pub fn attend_probabilities(
    probabilities: &Tensor,
    value: &Tensor,
    heads: usize,
) -> Result<Tensor> {
    let (batch_heads, queries, keys) = probabilities.dims3()?;
    let (batch, value_keys, inner) = value.dims3()?;
    check_heads(inner, heads)?;
    if batch_heads != batch * heads || value_keys != keys {
        candle_core::bail!(
            "attend probabilities: probabilities {:?} and value {:?} do not match {heads} heads",
            probabilities.dims(),
            value.dims()
        );
    }
    let head_dim = inner / heads;
    let block_rows = attention_block_rows(queries, keys);
    let out = with_f32_pair(probabilities, value, |probabilities, value| {
        parallel_row_blocks(
            batch * queries,
            inner,
            queries,
            block_rows,
            |global, slots| {
                let rows = slots.len() / inner.max(1);
                // Each head writes its own columns of the block.
                let block = zeroed(slots);
                let (item, query_index) = (global / queries, global % queries);
                for head in 0..heads {
                    let lhs = MatrixView::new(
                        probabilities,
                        ((item * heads + head) * queries + query_index) * keys,
                        (rows, keys),
                        keys,
                    );
                    let rhs = MatrixView::new(
                        value,
                        item * keys * inner + head * head_dim,
                        (keys, head_dim),
                        inner,
                    );
                    gemm_single_thread(&mut *block, head * head_dim, inner, lhs, rhs)?;
                }
                Ok(block)
            },
        )
    })?;
    Tensor::from_vec(out, (batch, queries, inner), value.device())?.to_dtype(value.dtype())
}

/// `softmax(scale * q k^T) v` over `heads` heads for f32 tensors: `query` `[batch, queries,
/// heads * d]`, `key_t` `[batch * heads, d, keys]` (see [`split_heads_transposed`](super::split_heads_transposed)), `value`
/// `[batch, keys, heads * d]` -> `[batch, queries, heads * d]`. Scores are never materialised
/// beyond one cache-sized block per core.
pub fn fused_attention(
    query: &Tensor,
    key_t: &Tensor,
    value: &Tensor,
    heads: usize,
    scale: f32,
) -> Result<Tensor> {
    fused_attention_observed(query, key_t, value, heads, scale, None)
}

/// [`fused_attention`] that also adds batch item `observed_item`'s probabilities averaged over the
/// heads to `head_mean_sum` `[queries, keys]` (a running sum such as the attention store's),
/// without materialising any item's probabilities per head: the observed item's query blocks add
/// their heads' normalised exponentials, times one over the heads, as they pass.
pub fn fused_attention_adding_head_mean(
    query: &Tensor,
    key_t: &Tensor,
    value: &Tensor,
    heads: usize,
    scale: f32,
    (observed_item, head_mean_sum): (usize, &mut [f32]),
) -> Result<Tensor> {
    fused_attention_observed(
        query,
        key_t,
        value,
        heads,
        scale,
        Some((observed_item, head_mean_sum)),
    )
}

/// [`fused_attention`], adding the observed item's head mean to its sum when one is given.
fn fused_attention_observed(
    query: &Tensor,
    key_t: &Tensor,
    value: &Tensor,
    heads: usize,
    scale: f32,
    observed: Option<(usize, &mut [f32])>,
) -> Result<Tensor> {
    let (batch, queries, inner) = query.dims3()?;
    let (batch_heads, head_dim, keys) = key_t.dims3()?;
    check_heads(inner, heads)?;
    if batch_heads != batch * heads
        || head_dim * heads != inner
        || value.dims3()? != (batch, keys, inner)
    {
        candle_core::bail!(
            "fused attention: query {:?}, key_t {:?}, value {:?} do not match {heads} heads",
            query.dims(),
            key_t.dims(),
            value.dims()
        );
    }
    let (query_f32, key_t_f32, value_f32) = (
        f32_operand(query)?,
        f32_operand(key_t)?,
        f32_operand(value)?,
    );
    let (observed_item, head_mean_sum) = observed.unzip();
    let out = with_values(&query_f32, |query| {
        with_values(&key_t_f32, |key_t| {
            with_values(&value_f32, |value| {
                FusedAttention {
                    query,
                    key_t,
                    value,
                    batch,
                    queries,
                    keys,
                    heads,
                    head_dim,
                    scale,
                    observed_item,
                }
                .run(head_mean_sum)
            })
        })
    })?;
    Tensor::from_vec(out, (batch, queries, inner), query.device())?.to_dtype(query.dtype())
}

/// The mean over the first dimension of an f32-convertible tensor: `[planes, ...]` -> `[...]`
/// (e.g. the head mean of attention probabilities), summed plane by plane in order with
/// contiguous, vectorised loops spread over the cores.
pub fn mean_of_planes(xs: &Tensor) -> Result<Tensor> {
    let dims = xs.dims();
    let Some((&planes, rest)) = dims.split_first() else {
        candle_core::bail!("mean of planes: a scalar has no planes");
    };
    if planes == 0 || !xs.device().is_cpu() {
        return xs.to_dtype(candle_core::DType::F32)?.mean(0);
    }
    let plane: usize = rest.iter().product();
    let values = f32_operand(xs)?;
    let inverse = 1.0 / planes as f32;
    let out = with_values(&values, |values| {
        Ok(parallel_filled(plane, plane, |first, piece: &mut [f32]| {
            for index in 0..planes {
                let src = &values[index * plane + first..][..piece.len()];
                for (sum, &v) in piece.iter_mut().zip(src) {
                    *sum += v;
                }
            }
            for sum in piece.iter_mut() {
                *sum *= inverse;
            }
        }))
    })?;
    Tensor::from_vec(out, rest, xs.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::split_heads_transposed;
    use crate::kernels::test_support::max_abs_diff;
    use candle_core::{DType, Device};

    /// Plain per-head attention: `[batch, n, heads * d]` inputs -> (probabilities `[batch * heads,
    /// queries, keys]`, output `[batch, queries, heads * d]`).
    fn reference_attention(
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        heads: usize,
        scale: f64,
    ) -> (Tensor, Tensor) {
        let split = |xs: &Tensor| {
            let (batch, n, inner) = xs.dims3().unwrap();
            xs.reshape((batch, n, heads, inner / heads))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((batch * heads, n, inner / heads))
                .unwrap()
        };
        let (q, k, v) = (split(query), split(key), split(value));
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        let out = probs.matmul(&v).unwrap();
        let (batch, queries, inner) = query.dims3().unwrap();
        let merged = out
            .reshape((batch, heads, queries, inner / heads))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((batch, queries, inner))
            .unwrap();
        (probs, merged)
    }

    /// Random operands of one attention and the plain computation's results.
    struct Case {
        query: Tensor,
        /// The keys as `split_heads_transposed` gives them.
        key_t: Tensor,
        value: Tensor,
        scale: f64,
        /// [`reference_attention`]'s probabilities and output.
        probs: Tensor,
        expected: Tensor,
    }

    fn random_case(
        batch: usize,
        (queries, keys): (usize, usize),
        heads: usize,
        head_dim: usize,
    ) -> Case {
        let device = Device::Cpu;
        let inner = heads * head_dim;
        let query = Tensor::randn(0f32, 1.0, (batch, queries, inner), &device).unwrap();
        let key = Tensor::randn(0f32, 1.0, (batch, keys, inner), &device).unwrap();
        let value = Tensor::randn(0f32, 1.0, (batch, keys, inner), &device).unwrap();
        let scale = 1.0 / (head_dim as f64).sqrt();
        let (probs, expected) = reference_attention(&query, &key, &value, heads, scale);
        let key_t = split_heads_transposed(&key, heads).unwrap();
        Case {
            query,
            key_t,
            value,
            scale,
            probs,
            expected,
        }
    }

    #[test]
    fn attention_kernels_match_plain_attention() {
        let device = Device::Cpu;
        // 600 keys make blocks of 109 queries: blocks end inside and at the items' 250 queries.
        // With AVX-512 the f32 tiles take them all: 77 and 600 keys end in partial vectors,
        // heads of 40 and 80 values end inside a vector (the values' rows are padded), 20 and
        // 250 queries end inside a tile of 8. Without a head mean, more than 480 keys go with
        // the queries along the lanes (`attention_f32::attention_by_query_lanes`): 600, 500 and
        // 517 keys end in a partial chunk of 128 (517 in a partial tile of 8 keys), 45 and 250
        // queries in a partial group of 48, heads of 5 and 13 values in a partial tile of 8.
        let shapes = [
            (2, 250, 600, 3, 5),
            (2, 45, 500, 2, 40),
            (1, 50, 517, 2, 13),
            (1, 7, 77, 2, 8),
            (2, 20, 160, 2, 40),
            (1, 9, 48, 1, 80),
        ];
        for (batch, queries, keys, heads, head_dim) in shapes {
            let Case {
                query,
                key_t,
                value,
                scale,
                probs,
                expected,
            } = random_case(batch, (queries, keys), heads, head_dim);

            let fused = fused_attention(&query, &key_t, &value, heads, scale as f32).unwrap();
            assert!(max_abs_diff(&fused, &expected) < 1e-5);
            let computed = attention_probabilities(&query, &key_t, heads, scale as f32).unwrap();
            assert!(max_abs_diff(&computed, &probs) < 1e-6);
            let attended = attend_probabilities(&probs, &value, heads).unwrap();
            assert!(max_abs_diff(&attended, &expected) < 1e-5);
            // The head mean of each item is added to a sum, beside the same output.
            for item in 0..batch {
                let mut sum = vec![0.5f32; queries * keys];
                let output = fused_attention_adding_head_mean(
                    &query,
                    &key_t,
                    &value,
                    heads,
                    scale as f32,
                    (item, &mut sum),
                )
                .unwrap();
                assert!(max_abs_diff(&output, &expected) < 1e-5);
                let item_probs = probs.narrow(0, item * heads, heads).unwrap();
                let expected_sum = (mean_of_planes(&item_probs).unwrap() + 0.5).unwrap();
                let sum = Tensor::from_vec(sum, (queries, keys), &device).unwrap();
                assert!(max_abs_diff(&sum, &expected_sum) < 1e-6);
            }
            let mut sum = vec![0f32; queries * keys];
            let outside = fused_attention_adding_head_mean(
                &query,
                &key_t,
                &value,
                heads,
                1.0,
                (batch, &mut sum),
            );
            assert!(outside.unwrap_err().to_string().contains("outside a batch"));
            let mut short = vec![0f32; queries * keys - 1];
            let short = fused_attention_adding_head_mean(
                &query,
                &key_t,
                &value,
                heads,
                1.0,
                (0, &mut short),
            );
            assert!(short.unwrap_err().to_string().contains("head mean sum of"));
        }
        // Shapes that do not fit are errors, not panics.
        let query = Tensor::zeros((1, 4, 6), DType::F32, &device).unwrap();
        let key_t = Tensor::zeros((2, 3, 5), DType::F32, &device).unwrap();
        let value = Tensor::zeros((1, 4, 6), DType::F32, &device).unwrap();
        assert!(fused_attention(&query, &key_t, &value, 2, 1.0).is_err());
        assert!(attention_probabilities(&query, &key_t, 4, 1.0).is_err());
        let probs = Tensor::zeros((2, 4, 5), DType::F32, &device).unwrap();
        assert!(attend_probabilities(&probs, &value, 2).is_err());
    }

    #[test]
    fn bf16_fused_attention_stays_near_f32() {
        use crate::kernels::{bf16_supported, with_product_precision, ProductPrecision};
        if !bf16_supported() {
            return;
        }
        // An odd key count pads the last pair of the bf16 exponentials.
        for (batch, queries, keys, heads, head_dim) in [(2, 250, 601, 3, 16), (2, 64, 77, 2, 32)] {
            let Case {
                query,
                key_t,
                value,
                scale,
                probs,
                expected,
            } = random_case(batch, (queries, keys), heads, head_dim);
            let mut mean = vec![0f32; queries * keys];
            let output = with_product_precision(ProductPrecision::Bf16, || {
                fused_attention_adding_head_mean(
                    &query,
                    &key_t,
                    &value,
                    heads,
                    scale as f32,
                    (1, &mut mean),
                )
            })
            .unwrap();
            let mean = Tensor::from_vec(mean, (queries, keys), &Device::Cpu).unwrap();
            let plain = with_product_precision(ProductPrecision::Bf16, || {
                fused_attention(&query, &key_t, &value, heads, scale as f32)
            })
            .unwrap();
            // bf16 operands (8 significant bits) in both products.
            let output_error = max_abs_diff(&output, &expected);
            assert!(output_error < 3e-2, "output off by {output_error}");
            assert!(max_abs_diff(&plain, &output) < 1e-6);
            let expected_mean = mean_of_planes(&probs.narrow(0, heads, heads).unwrap()).unwrap();
            let mean_error = max_abs_diff(&mean, &expected_mean);
            assert!(mean_error < 5e-3, "head mean off by {mean_error}");
        }
    }

    #[test]
    fn mean_of_planes_matches_mean() {
        let device = Device::Cpu;
        let xs = Tensor::randn(0f32, 1.0, (3, 300, 301), &device).unwrap();
        let expected = xs.mean(0).unwrap();
        assert!(max_abs_diff(&mean_of_planes(&xs).unwrap(), &expected) < 1e-6);
        let narrowed = xs.narrow(0, 1, 2).unwrap();
        let expected = narrowed.mean(0).unwrap();
        assert!(max_abs_diff(&mean_of_planes(&narrowed).unwrap(), &expected) < 1e-6);
    }
}

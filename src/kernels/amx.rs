//! The bf16 product on Intel AMX tiles (`tdpbf16ps`: a 16x16 f32 tile plus a 16x32 bf16 tile
//! times a 32x16 one), for CPUs that have AMX-TILE and AMX-BF16 and an OS that lets the process
//! use the tile registers (Linux grants them on request). On such a CPU it replaces the AVX-512
//! register tiles of every bf16 product (see `bf16.rs`), with the same operands: the packed left
//! rows of bf16 pairs are already an AMX left tile's layout, and a packed right panel's rows of
//! pairs are an AMX right tile's.
//!
//! Every element is the sum of its pairs in the same order, 16 pairs per tile product, the last
//! partial group zero-padded, whatever the product's shape or how its rows are split among
//! calls: a row's result never depends on which block or which call it came in. It can differ
//! from the AVX-512 kernel's in the last bits of the f32 sums (the two instructions round their
//! partial sums differently); both are products of the same bf16 operands.
//!
//! As in the AVX-512 kernel, a bias or an accumulated destination is added once the products are
//! summed (one f32 sum), so a layer that adds its bias inside the product and one that adds it
//! afterwards give the same bits. Starting the result tiles from the bias instead (tried) doubled
//! the drift between such paths: a same-prompt edit moved 1.81 levels of 255 instead of 0.92.
//!
//! Setting the environment variable `ATTEND_NO_AMX` keeps the AVX-512 kernel.

use std::sync::OnceLock;

/// Whether the bf16 products run on AMX tiles in this process: the CPU has AMX-TILE and
/// AMX-BF16 (and AVX-512 BF16, which the rest of the bf16 path needs), the OS granted the tile
/// registers, and `ATTEND_NO_AMX` is not set. Asked once.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) fn amx_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        std::env::var_os("ATTEND_NO_AMX").is_none()
            && super::bf16::bf16_supported()
            && cpu_has_amx_bf16()
            && tile_registers_granted()
    })
}

/// CPUID leaf 7: AMX-BF16 (EDX bit 22) and AMX-TILE (EDX bit 24).
#[cfg(target_arch = "x86_64")]
fn cpu_has_amx_bf16() -> bool {
    let leaf = std::arch::x86_64::__cpuid_count(7, 0);
    leaf.edx & (1 << 22) != 0 && leaf.edx & (1 << 24) != 0
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_amx_bf16() -> bool {
    false
}

/// Asks Linux for the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`);
/// the grant holds for every thread of the process.
#[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
fn tile_registers_granted() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    #[allow(unsafe_code)]
    // SAFETY: arch_prctl with these arguments only changes the process's permitted extended
    // state; it reads and writes no memory of ours.
    let status = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    status == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu")))]
fn tile_registers_granted() -> bool {
    false
}

/// Rows of the result per block: two 16-row tiles.
#[cfg(target_arch = "x86_64")]
const BLOCK_ROWS: usize = 32;
/// Pairs of `k` per tile product (a 64-byte tile row of u32 pairs).
#[cfg(target_arch = "x86_64")]
const TILE_PAIRS: usize = 16;

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
pub(super) mod x86 {
    //! The tile kernel. Tile registers: `tmm0..tmm3` the 2x2 result tiles of a 32x32 block,
    //! `tmm4`/`tmm5` the block's two 16-row left tiles, `tmm6`/`tmm7` its two 16-column right
    //! tiles; all configured as 16 rows of 64 bytes.

    use std::arch::asm;
    use std::arch::x86_64::*;

    use super::{BLOCK_ROWS, TILE_PAIRS};
    use crate::kernels::bf16::x86::lanes;
    use crate::kernels::bf16::Store;

    /// The tile configuration: palette 1, eight tiles of 16 rows by 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    impl TileConfig {
        fn sixteen_by_64_bytes() -> Self {
            let mut config = [0u8; 64];
            config[0] = 1;
            for tile in 0..8 {
                config[16 + 2 * tile] = 64;
                config[48 + tile] = 16;
            }
            Self(config)
        }
    }

    /// `dst (+)= lhs_pairs * rhs_panels` for an `m x n` product over `pairs` pairs of `k`, the
    /// operands packed as `bf16::x86::pack_lhs` and `pack_rhs` pack them (left rows of pairs,
    /// right panels of `panel_columns` columns), stored as `store` says; every element of the
    /// result is written.
    ///
    /// # Safety
    /// `super::amx_ready()` holds (AMX-TILE, AMX-BF16 and AVX-512 present, tiles granted); the
    /// packed operands have those layouts (`lhs_pairs` at least `m * pairs`, `rhs_panels` at least
    /// `pairs * n.div_ceil(16) * 16` values); the `m x n` result at `dst_offset` (rows
    /// `dst_stride` apart) lies inside the buffer at `dst`, writable (and readable with
    /// [`Store::Accumulate`]); a bias holds at least `n` values.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[allow(clippy::too_many_arguments)]
    pub(in crate::kernels) unsafe fn multiply(
        lhs_pairs: &[u32],
        rhs_panels: &[u32],
        (m, pairs, n): (usize, usize, usize),
        panel_columns: usize,
        dst: *mut f32,
        dst_offset: usize,
        dst_stride: usize,
        store: Store<'_>,
    ) {
        if m == 0 || n == 0 {
            return;
        }
        let whole_steps = pairs / TILE_PAIRS;
        let tail_pairs = pairs % TILE_PAIRS;
        // The last, partial group of pairs of a block's rows and of a panel, zero-padded to a
        // whole tile; the rows after the last whole block, zero-padded to a whole block.
        let mut lhs_tail = [0u32; BLOCK_ROWS * TILE_PAIRS];
        let mut rhs_tail = vec![0u32; TILE_PAIRS * panel_columns];
        let mut short_rows = Vec::new();
        let mut result = [0f32; BLOCK_ROWS * 32];
        let config = TileConfig::sixteen_by_64_bytes();
        asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
        let mut panel_start = 0;
        while panel_start < n {
            let columns = (n - panel_start).min(panel_columns);
            let width = columns.div_ceil(16) * 16;
            let panel = rhs_panels.as_ptr().add(pairs * panel_start);
            if tail_pairs > 0 {
                rhs_tail[..TILE_PAIRS * width].fill(0);
                std::ptr::copy_nonoverlapping(
                    panel.add(whole_steps * TILE_PAIRS * width),
                    rhs_tail.as_mut_ptr(),
                    tail_pairs * width,
                );
            }
            let mut row = 0;
            while row < m {
                let rows = (m - row).min(BLOCK_ROWS);
                // The block's left rows: in place when whole, else copied and zero-padded.
                let (lhs, lhs_stride) = if rows == BLOCK_ROWS {
                    (lhs_pairs.as_ptr().add(row * pairs), pairs)
                } else {
                    short_rows.clear();
                    short_rows.resize(BLOCK_ROWS * pairs, 0u32);
                    std::ptr::copy_nonoverlapping(
                        lhs_pairs.as_ptr().add(row * pairs),
                        short_rows.as_mut_ptr(),
                        rows * pairs,
                    );
                    (short_rows.as_ptr(), pairs)
                };
                if tail_pairs > 0 {
                    for block_row in 0..BLOCK_ROWS {
                        let src = lhs.add(block_row * lhs_stride + whole_steps * TILE_PAIRS);
                        let dst_row = lhs_tail.as_mut_ptr().add(block_row * TILE_PAIRS);
                        std::ptr::copy_nonoverlapping(src, dst_row, tail_pairs);
                    }
                }
                let mut half_start = 0;
                while half_start < width {
                    let both_columns = half_start + 32 <= width;
                    let rhs = panel.add(half_start);
                    let rhs_stride_bytes = width * 4;
                    asm!(
                        "tilezero tmm0",
                        "tilezero tmm1",
                        "tilezero tmm2",
                        "tilezero tmm3",
                        options(nostack, nomem)
                    );
                    for step in 0..whole_steps {
                        let a = lhs.add(step * TILE_PAIRS);
                        let b = rhs.add(step * TILE_PAIRS * width);
                        products(
                            (a, a.add(16 * lhs_stride), lhs_stride * 4),
                            (b, b.add(16), rhs_stride_bytes),
                            both_columns,
                        );
                    }
                    if tail_pairs > 0 {
                        let a = lhs_tail.as_ptr();
                        let b = rhs_tail.as_ptr().add(half_start);
                        products(
                            (a, a.add(16 * TILE_PAIRS), TILE_PAIRS * 4),
                            (b, b.add(16), rhs_stride_bytes),
                            both_columns,
                        );
                    }
                    let block_columns = (columns - half_start.min(columns)).min(32);
                    let block_dst =
                        dst.add(dst_offset + row * dst_stride + panel_start + half_start);
                    // A whole block that replaces its destination goes there straight from the
                    // tiles (the same values as through `write_block`), unless the destination's
                    // rows are a multiple of 2 KiB apart: a tile's 16 rows would then share a few
                    // L1 cache sets (an attention's scores at 1024 keys stored that way took
                    // 4-13% longer).
                    if !(dst_stride * 4).is_multiple_of(2048)
                        && matches!(store, Store::Replace)
                        && (rows, block_columns) == (BLOCK_ROWS, 32)
                    {
                        store_tiles(block_dst, dst_stride * 4);
                        half_start += 32;
                        continue;
                    }
                    store_tiles(result.as_mut_ptr(), 32 * 4);
                    write_block(
                        &result,
                        (rows, block_columns),
                        block_dst,
                        dst_stride,
                        store,
                        panel_start + half_start,
                    );
                    half_start += 32;
                }
                row += rows;
            }
            panel_start += panel_columns;
        }
        asm!("tilerelease", options(nostack, nomem));
    }

    /// The four result tiles as one 32x32 block at `out` (rows `stride_bytes` apart): `tmm0` top
    /// left, `tmm1` top right, `tmm2` bottom left, `tmm3` bottom right.
    ///
    /// # Safety
    /// The tiles are configured (16 rows of 64 bytes) and the block's 32 rows of 32 values at
    /// `out` are writable.
    #[inline(always)]
    unsafe fn store_tiles(out: *mut f32, stride_bytes: usize) {
        asm!(
            "tilestored [{out} + {stride}*1], tmm0",
            "tilestored [{out_low} + {stride}*1], tmm2",
            "tilestored [{out_right} + {stride}*1], tmm1",
            "tilestored [{out_low_right} + {stride}*1], tmm3",
            out = in(reg) out,
            out_low = in(reg) out.byte_add(16 * stride_bytes),
            out_right = in(reg) out.add(16),
            out_low_right = in(reg) out.byte_add(16 * stride_bytes).add(16),
            stride = in(reg) stride_bytes,
            options(nostack)
        );
    }

    /// One group of 16 pairs into the result tiles: left tiles `tmm4` (rows 0-15) and `tmm5`
    /// (rows 16-31) from `a_top`/`a_bottom` (rows `a_stride_bytes` apart), right tiles `tmm6`
    /// (columns 0-15) and, when `both_columns`, `tmm7` (columns 16-31) from `b_left`/`b_right`
    /// (rows of pairs `b_stride_bytes` apart).
    ///
    /// # Safety
    /// The tiles are configured (16 rows of 64 bytes) and every row read lies inside its buffer.
    #[inline(always)]
    unsafe fn products(
        (a_top, a_bottom, a_stride_bytes): (*const u32, *const u32, usize),
        (b_left, b_right, b_stride_bytes): (*const u32, *const u32, usize),
        both_columns: bool,
    ) {
        asm!(
            "tileloadd tmm4, [{a_top} + {a_stride}*1]",
            "tileloadd tmm5, [{a_bottom} + {a_stride}*1]",
            "tileloadd tmm6, [{b_left} + {b_stride}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm2, tmm5, tmm6",
            a_top = in(reg) a_top,
            a_bottom = in(reg) a_bottom,
            a_stride = in(reg) a_stride_bytes,
            b_left = in(reg) b_left,
            b_stride = in(reg) b_stride_bytes,
            options(nostack, readonly)
        );
        if both_columns {
            asm!(
                "tileloadd tmm7, [{b_right} + {b_stride}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm3, tmm5, tmm7",
                b_right = in(reg) b_right,
                b_stride = in(reg) b_stride_bytes,
                options(nostack, readonly)
            );
        }
    }

    /// The first `rows x columns` of a stored 32x32 block (`result`, rows 32 apart) to `dst`
    /// (rows `dst_stride` apart) as `store` says; a bias is read from `bias[first_column..]`.
    ///
    /// # Safety
    /// The `rows x columns` destination is writable (readable with [`Store::Accumulate`]); a
    /// bias holds at least `first_column + columns` values.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn write_block(
        result: &[f32; BLOCK_ROWS * 32],
        (rows, columns): (usize, usize),
        dst: *mut f32,
        dst_stride: usize,
        store: Store<'_>,
        first_column: usize,
    ) {
        for row in 0..rows {
            let out = dst.add(row * dst_stride);
            let mut column = 0;
            while column < columns {
                let mask = lanes(columns - column);
                let value = _mm512_loadu_ps(result.as_ptr().add(row * 32 + column));
                let at = out.add(column);
                let value = match store {
                    Store::Replace => value,
                    Store::Accumulate => _mm512_add_ps(value, _mm512_maskz_loadu_ps(mask, at)),
                    Store::AddBias(bias) => _mm512_add_ps(
                        value,
                        _mm512_maskz_loadu_ps(mask, bias.as_ptr().add(first_column + column)),
                    ),
                };
                _mm512_mask_storeu_ps(at, mask, value);
                column += 16;
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
#[allow(unsafe_code)]
mod tests {
    use crate::kernels::bf16::x86::{multiply_register_tiles, pack_lhs, pack_rhs};
    use crate::kernels::bf16::{Store, PANEL_COLUMNS};
    use crate::kernels::test_support::values;

    #[test]
    fn tiles_and_register_tiles_give_the_same_products() {
        // Both kernels sum the same bf16 operands in f32; only their rounding of partial sums
        // differs. Shapes with partial row blocks, pair groups and panels, and a bias.
        if !super::amx_ready() {
            return;
        }
        for (m, k, n) in [
            (1usize, 2usize, 16usize),
            (33, 31, 80),
            (64, 64, 64),
            (40, 1000, 130),
        ] {
            let pairs = k.div_ceil(2);
            let lhs = values(m * k, 5);
            let rhs = values(k * n, 6);
            let bias = values(n, 7);
            let mut lhs_pairs = vec![0u32; m * pairs];
            let mut panels = vec![0u32; pairs * n.div_ceil(16) * 16];
            let mut tiles = vec![f32::NAN; m * n];
            let mut registers = vec![f32::NAN; m * n];
            // SAFETY: AMX and AVX-512 BF16 are present (`amx_ready`); the buffers have the packed
            // lengths and the `m x n` results exactly fill `tiles` and `registers`.
            unsafe {
                pack_lhs(&lhs, 0, k, m, k, &mut lhs_pairs);
                pack_rhs(&rhs, 0, n, k, n, &mut panels);
                let store = Store::AddBias(&bias);
                super::x86::multiply(
                    &lhs_pairs,
                    &panels,
                    (m, pairs, n),
                    PANEL_COLUMNS,
                    tiles.as_mut_ptr(),
                    0,
                    n,
                    store,
                );
                multiply_register_tiles(
                    &lhs_pairs,
                    &panels,
                    (m, pairs, n),
                    registers.as_mut_ptr(),
                    0,
                    n,
                    store,
                );
            }
            for (index, (&a, &b)) in tiles.iter().zip(&registers).enumerate() {
                let bound = 2e-6 * (k as f32).sqrt() * (1.0 + b.abs());
                assert!((a - b).abs() <= bound, "{m}x{k}x{n} [{index}]: {a} vs {b}");
            }
        }
    }
}

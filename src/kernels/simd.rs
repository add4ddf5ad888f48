//! Vector-friendly math: the `simd_kernel!` macro that compiles a kernel's loops once per vector
//! instruction level, branch-free `exp`/`erf` with SiLU and GELU on top, and lane-parallel
//! reductions (maximum, sum) for row kernels.

/// Declares an element-wise kernel whose loops are compiled once per vector instruction level
/// (AVX-512, AVX2+FMA, ...), the level picked at run time: `simd_kernel!(Name<'a> { field: Type, ..
/// } => body)` makes a struct; `pulp::Arch::new().dispatch(Name { .. })` runs `body` (with the
/// fields bound by name) inside a function with the level's target features. Everything `body`
/// calls must be `#[inline(always)]` to be vectorised for the level. (A closure would not do: its
/// body is compiled on its own, for the baseline instruction set.) A visibility before the name
/// (`pub(super) Name<'a>`) applies to the struct and its fields, for kernels that other kernel
/// files dispatch.
macro_rules! simd_kernel {
    ($(#[$meta:meta])* $vis:vis $name:ident<$lt:lifetime> { $($field:ident: $ty:ty),* $(,)? } => $body:block) => {
        $(#[$meta])*
        $vis struct $name<$lt> {
            $($vis $field: $ty),*
        }

        impl<$lt> pulp::WithSimd for $name<$lt> {
            type Output = ();

            #[inline(always)]
            fn with_simd<S: pulp::Simd>(self, _simd: S) {
                let Self { $($field),* } = self;
                $body
            }
        }
    };
}

pub(super) use simd_kernel;

/// `e^x` for f32 (Cephes' `expf` polynomial, about 2 ulp), written branch-free so loops vectorise.
#[inline(always)]
pub(super) fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer.
    let x = x.clamp(-87.0, 88.0);
    // `shifted`'s low mantissa bits hold round(x * log2 e) + 2^22 (no float -> int cast, whose
    // saturating semantics would keep the loop scalar).
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * z + r + 1.0;
    // (2^22 + n + 127) << 23 keeps just the biased exponent n + 127 (1..=254 after the clamp).
    let bits = shifted.to_bits().wrapping_add(127) << 23;
    y * f32::from_bits(bits)
}

/// `2^t` for `t <= 0` to within 7.5e-5 (relative; a degree-3 polynomial, fitted here to the
/// relative error on `[-1/2, 1/2]`), for softmax weights that are rounded to bf16 afterwards
/// (8 significant bits): about half the operations of [`fast_exp`]. Below `2^-125` it gives
/// about `2^-125`.
#[inline(always)]
pub(super) fn exp2_for_bf16(t: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer.
    let t = t.max(-125.0);
    let shifted = t + ROUND;
    let n = shifted - ROUND;
    let f = t - n;
    let p = f
        .mul_add(0.055_171_67, 0.242_611_14)
        .mul_add(f, 0.693_260_97)
        .mul_add(f, 0.999_928_06);
    // `shifted`'s low mantissa bits hold n + 2^22; shifted into the exponent field they add n
    // (mod 2^9, which wraps to the right value for negative n) to `p`'s exponent.
    f32::from_bits(p.to_bits().wrapping_add(shifted.to_bits() << 23))
}

/// `erf(x)` to within 4e-7 (absolute; f32 evaluation of a rational approximation whose own
/// error is below 7e-8): `x P(x^2) / Q(x^2)` with `x` clamped to +-3.93, beyond which `erf` is 1
/// to f32 precision. Fitted by `scripts/fit_erf.py` (weighted least squares iterated towards
/// equal ripple on [0, 3.93]; the leading coefficient is `erf'(0) = 2 / sqrt(pi)`); odd by
/// construction, no exponential, branch-free.
#[inline(always)]
pub(super) fn fast_erf(x: f32) -> f32 {
    const LIMIT: f32 = 3.93;
    let x = x.clamp(-LIMIT, LIMIT);
    let z = x * x;
    let p = z
        .mul_add(2.176_576_8e-6, 2.853_048_2e-4)
        .mul_add(z, 3.520_020_5e-3)
        .mul_add(z, 5.200_328e-2)
        .mul_add(z, 1.838_739_2e-1)
        .mul_add(z, std::f32::consts::FRAC_2_SQRT_PI);
    let q = z
        .mul_add(3.942_862e-5, 1.114_251_3e-3)
        .mul_add(z, 1.446_983_7e-2)
        .mul_add(z, 1.115_172e-1)
        .mul_add(z, 4.962_870_2e-1)
        .mul_add(z, 1.0);
    (x * p / q).clamp(-1.0, 1.0)
}

/// `x * sigmoid(x)`.
#[inline(always)]
pub(super) fn silu(x: f32) -> f32 {
    x / (1.0 + fast_exp(-x))
}

/// `x * Phi(x)` with the exact (erf) normal CDF, as `torch.nn.functional.gelu`.
#[inline(always)]
pub(super) fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + fast_erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Maximum of a slice, in [`REDUCTION_LANES`] independent lanes so the loop vectorises
/// (`-inf` for an empty slice).
#[inline(always)]
pub(super) fn lane_max(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; REDUCTION_LANES];
    let mut chunks = values.chunks_exact(REDUCTION_LANES);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = if v > *lane { v } else { *lane };
        }
    }
    // The tail padded to a whole chunk, so that it vectorises too (a 77-key row has 13).
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut padded = [f32::NEG_INFINITY; REDUCTION_LANES];
        padded[..rest.len()].copy_from_slice(rest);
        for (lane, &v) in lanes.iter_mut().zip(&padded) {
            *lane = if v > *lane { v } else { *lane };
        }
    }
    halve_lanes(lanes, |a, b| if b > a { b } else { a })
}

/// The lanes of a row reduction folded pairwise, half of them at a time (six vector steps for 64
/// lanes, where a lane-by-lane fold costs 63 dependent scalar operations: as much as the whole
/// row for a 77-key attention row).
#[inline(always)]
pub(super) fn halve_lanes(
    mut lanes: [f32; REDUCTION_LANES],
    combine: impl Fn(f32, f32) -> f32,
) -> f32 {
    let mut width = REDUCTION_LANES;
    while width > 1 {
        width /= 2;
        let (low, high) = lanes.split_at_mut(width);
        for (a, &b) in low.iter_mut().zip(high.iter()) {
            *a = combine(*a, b);
        }
    }
    lanes[0]
}

/// The sum of a row reduction's lanes (see [`halve_lanes`]).
#[inline(always)]
pub(super) fn sum_lanes(lanes: [f32; REDUCTION_LANES]) -> f32 {
    halve_lanes(lanes, |a, b| a + b)
}

/// The sum of `f(v)` over `values`, in `LANES` independent lanes so the loop vectorises (few
/// lanes for short rows, such as a layer norm's 128 channels, whose final sum of the lanes would
/// otherwise cost as much as the row).
#[inline(always)]
pub(super) fn lane_sum<const LANES: usize>(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += f(v);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    lanes.iter().sum::<f32>() + tail
}

/// Independent accumulators of the row reductions: four AVX-512 registers, so the loops are not
/// bound by the latency of one register's chain of adds.
pub(super) const REDUCTION_LANES: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_and_erf_are_accurate() {
        let mut worst_exp = 0f64;
        let mut worst_erf = 0f64;
        for i in -8000..=8000 {
            let x = i as f32 * 0.01;
            let exact = f64::from(x).exp();
            worst_exp = worst_exp.max(((f64::from(fast_exp(x)) - exact) / exact).abs());
            let exact_erf = libm_erf(f64::from(x));
            worst_erf = worst_erf.max((f64::from(fast_erf(x)) - exact_erf).abs());
        }
        assert!(worst_exp < 3e-7, "exp relative error {worst_exp}");
        // Out of range inputs clamp to e^-87 and e^88 (finite, positive).
        for (x, clamped) in [
            (-1000.0f32, -87.0f64),
            (-87.0, -87.0),
            (88.0, 88.0),
            (1e6, 88.0),
        ] {
            let relative = (f64::from(fast_exp(x)) - clamped.exp()).abs() / clamped.exp();
            assert!(relative < 3e-7, "exp({x}) relative error {relative}");
        }
        assert!(worst_erf < 4e-7, "erf abs error {worst_erf}");
    }

    #[test]
    fn the_exponential_for_bf16_weights_is_within_its_bound() {
        let mut worst = 0f64;
        for i in 0..=125_000 {
            let t = -(i as f32) * 0.001;
            let exact = f64::from(t).exp2();
            worst = worst.max(((f64::from(exp2_for_bf16(t)) - exact) / exact).abs());
        }
        assert!(worst < 7.6e-5, "2^t relative error {worst}");
        // Far below, the floor: 2^-125 within the same bound (positive, normal).
        for t in [-1000.0, f32::NEG_INFINITY] {
            let relative = (exp2_for_bf16(t) / 2f32.powi(-125) - 1.0).abs();
            assert!(relative < 7.6e-5, "2^{t}: {}", exp2_for_bf16(t));
        }
    }

    /// erf by its Taylor series / continued fraction (f64), for the test only.
    fn libm_erf(x: f64) -> f64 {
        if x.abs() > 6.0 {
            return x.signum();
        }
        if x.abs() < 2.5 {
            let mut term = x;
            let mut sum = x;
            for n in 1..200 {
                term *= -x * x / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            return sum * 2.0 / std::f64::consts::PI.sqrt();
        }
        // erfc continued fraction for large |x|.
        let a = x.abs();
        let mut fraction = 0.0;
        for n in (1..200).rev() {
            fraction = (n as f64 / 2.0) / (a + fraction);
        }
        let erfc = (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + fraction);
        x.signum() * (1.0 - erfc)
    }
}

//! attend's own deterministic random numbers: the same seed gives the same initial latents and the
//! same ancestral noise on every platform.
//!
//! Uniform bits come from xoshiro256** seeded through SplitMix64; normal samples come from the
//! Marsaglia polar method. Only IEEE-exact operations are used (`+ - * /`, `sqrt`) plus a logarithm
//! written here with those operations, so no platform math library can change a single bit.

use candle_core::{Device, Shape, Tensor};

use crate::pipeline::{PipelineError, PipelineResult};

/// A seeded generator of uniform and standard-normal numbers (xoshiro256** + polar method).
#[derive(Clone, Debug)]
pub struct NoiseRng {
    state: [u64; 4],
    /// The second value of the last polar-method pair, handed out by the next call.
    spare_normal: Option<f64>,
}

impl NoiseRng {
    /// A generator whose whole stream is determined by `seed`.
    pub fn new(seed: u64) -> Self {
        let mut splitmix_state = seed;
        let mut state = [0u64; 4];
        for word in &mut state {
            *word = splitmix64(&mut splitmix_state);
        }
        Self {
            state,
            spare_normal: None,
        }
    }

    /// The next 64 uniformly distributed bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.state[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let shifted = self.state[1] << 17;
        self.state[2] ^= self.state[0];
        self.state[3] ^= self.state[1];
        self.state[1] ^= self.state[2];
        self.state[0] ^= self.state[3];
        self.state[2] ^= shifted;
        self.state[3] = self.state[3].rotate_left(45);
        result
    }

    /// A uniform number in `[0, 1)` with 53 random bits.
    pub fn next_unit_f64(&mut self) -> f64 {
        // 53 bits fit exactly in an f64 mantissa.
        #[allow(clippy::cast_precision_loss)]
        let mantissa = (self.next_u64() >> 11) as f64;
        mantissa * (1.0 / (1u64 << 53) as f64)
    }

    /// A standard-normal sample (mean 0, variance 1).
    pub fn next_normal_f64(&mut self) -> f64 {
        if let Some(spare) = self.spare_normal.take() {
            return spare;
        }
        loop {
            let u = 2.0 * self.next_unit_f64() - 1.0;
            let v = 2.0 * self.next_unit_f64() - 1.0;
            let radius_squared = u * u + v * v;
            if radius_squared > 0.0 && radius_squared < 1.0 {
                let factor = (-2.0 * portable_ln(radius_squared) / radius_squared).sqrt();
                self.spare_normal = Some(v * factor);
                return u * factor;
            }
        }
    }

    /// A tensor of standard-normal f32 samples, filled in row-major order.
    ///
    /// For initial latents the shape is `[1, channels, h, w]`. A shape whose element count
    /// overflows, or whose buffer cannot be allocated, is an error (never a panic or an abort).
    pub fn randn(&mut self, shape: impl Into<Shape>, device: &Device) -> PipelineResult<Tensor> {
        let shape: Shape = shape.into();
        let too_large = |reason: String| PipelineError::InvalidArgument {
            name: "noise shape",
            reason: format!("{:?}: {reason}", shape.dims()),
        };
        let count = shape
            .dims()
            .iter()
            .try_fold(1usize, |count, &dim| count.checked_mul(dim))
            .ok_or_else(|| too_large("the element count overflows".to_string()))?;
        let mut values: Vec<f32> = Vec::new();
        values
            .try_reserve_exact(count)
            .map_err(|error| too_large(format!("cannot allocate {count} values: {error}")))?;
        values.extend((0..count).map(|_| {
            // Rounding to the nearest f32 is the intended conversion.
            #[allow(clippy::cast_possible_truncation)]
            let value = self.next_normal_f64() as f32;
            value
        }));
        Ok(Tensor::from_vec(values, shape, device)?)
    }
}

/// One SplitMix64 step: spreads a seed over the xoshiro state.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Natural logarithm of a positive, finite, normal `x`, computed with IEEE-exact operations only so
/// that every platform gets the same bits (accurate to a few ulp).
fn portable_ln(x: f64) -> f64 {
    const LN_2: f64 = std::f64::consts::LN_2;
    const SQRT_2: f64 = std::f64::consts::SQRT_2;
    // Split x = mantissa * 2^exponent with mantissa in [1, 2) by reading the IEEE fields.
    let bits = x.to_bits();
    let biased_exponent = i64::try_from((bits >> 52) & 0x7ff).unwrap_or(0);
    let mut exponent = biased_exponent - 1023;
    let mut mantissa = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    // Centre the mantissa on 1: [sqrt(1/2), sqrt(2)).
    if mantissa >= SQRT_2 {
        mantissa *= 0.5;
        exponent += 1;
    }
    // ln(m) = 2 atanh(s) with s = (m - 1) / (m + 1), |s| <= 0.1716.
    let s = (mantissa - 1.0) / (mantissa + 1.0);
    let s2 = s * s;
    let mut term = s;
    let mut sum = 0.0;
    let mut odd = 1.0;
    // s^2 <= 0.0295, so 14 terms reach far below f64 precision.
    for _ in 0..14 {
        sum += term / odd;
        term *= s2;
        odd += 2.0;
    }
    // Exponents of normal numbers fit exactly in an f64.
    #[allow(clippy::cast_precision_loss)]
    let exponent = exponent as f64;
    2.0 * sum + exponent * LN_2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_numbers_on_every_platform() {
        // xoshiro256** seeded by SplitMix64(0): the reference generator's first outputs.
        let mut rng = NoiseRng::new(0);
        let bits: Vec<u64> = (0..3).map(|_| rng.next_u64()).collect();
        assert_eq!(
            bits,
            [
                11_091_344_671_253_066_420,
                13_793_997_310_169_335_082,
                1_900_383_378_846_508_768
            ]
        );
        // The normal samples are pinned bit for bit: a change here changes every seed's image.
        let mut rng = NoiseRng::new(42);
        let normals: Vec<u64> = (0..5).map(|_| rng.next_normal_f64().to_bits()).collect();
        assert_eq!(
            normals,
            [
                13_828_088_456_880_829_303,
                13_820_149_228_043_321_244,
                4_597_152_819_617_802_828,
                4_602_883_928_301_632_081,
                4_602_033_494_962_232_142
            ]
        );
        let mut other_seed = NoiseRng::new(43);
        assert_ne!(other_seed.next_normal_f64().to_bits(), normals[0]);
    }

    #[test]
    fn portable_ln_matches_std() {
        for &x in &[
            1e-300, 1e-10, 0.001, 0.25, 0.5, 0.7, 0.99999, 1.0, 1.5, 2.0, 10.0, 1e10,
        ] {
            let expected: f64 = f64::ln(x);
            let got = portable_ln(x);
            assert!(
                (got - expected).abs() <= 4.0 * f64::EPSILON * expected.abs().max(1.0),
                "ln({x}): {got} vs {expected}"
            );
        }
    }

    #[test]
    fn normals_have_unit_variance() {
        let mut rng = NoiseRng::new(7);
        let n = 200_000;
        let samples: Vec<f64> = (0..n).map(|_| rng.next_normal_f64()).collect();
        let mean = samples.iter().sum::<f64>() / f64::from(n);
        let variance = samples.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / f64::from(n);
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((variance - 1.0).abs() < 0.01, "variance {variance}");
    }

    #[test]
    fn randn_fills_the_shape() {
        let mut rng = NoiseRng::new(1);
        let t = rng.randn((1, 4, 3, 5), &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 4, 3, 5]);
        let mut again = NoiseRng::new(1);
        let u = again.randn((1, 4, 3, 5), &Device::Cpu).unwrap();
        let diff = (t - u).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }
}

//! Colormaps for heat maps, and blending a heat map over an image.
//!
//! Viridis, Inferno and Turbo are 33-stop tables (every 1/32 of the range, rounded to 8 bits) sampled
//! from the published colormaps and interpolated linearly; they stay within 2/255 of the originals.

use std::fmt;
use std::str::FromStr;

/// Stops per table: `t = i / (STOP_COUNT - 1)`.
const STOP_COUNT: usize = 33;

// Keep in sync with shaders/heatmap.wgsl (same tables, same order, same linear interpolation).
#[rustfmt::skip]
const VIRIDIS_STOPS: [[u8; 3]; STOP_COUNT] = [
    [68, 1, 84], [71, 13, 96], [72, 24, 106], [72, 35, 116],
    [71, 45, 123], [69, 54, 129], [66, 64, 134], [63, 73, 137],
    [59, 82, 139], [55, 90, 141], [51, 99, 141], [47, 106, 142],
    [44, 114, 142], [41, 122, 142], [38, 129, 142], [35, 137, 142],
    [33, 144, 140], [31, 152, 139], [31, 159, 136], [33, 166, 133],
    [40, 174, 128], [49, 181, 123], [62, 188, 116], [76, 194, 108],
    [93, 201, 99], [110, 206, 88], [130, 211, 76], [150, 216, 63],
    [171, 220, 50], [192, 223, 36], [213, 226, 26], [234, 229, 26],
    [253, 231, 37],
];

#[rustfmt::skip]
const INFERNO_STOPS: [[u8; 3]; STOP_COUNT] = [
    [0, 0, 4], [4, 3, 18], [11, 7, 36], [21, 11, 55],
    [33, 12, 74], [46, 10, 90], [60, 9, 101], [74, 12, 107],
    [87, 16, 109], [99, 20, 110], [112, 25, 110], [125, 30, 109],
    [137, 34, 106], [150, 39, 102], [163, 43, 97], [175, 49, 92],
    [187, 55, 85], [198, 62, 77], [209, 70, 68], [219, 79, 59],
    [227, 89, 50], [235, 101, 40], [241, 113, 30], [246, 127, 20],
    [249, 141, 10], [251, 156, 6], [252, 171, 15], [251, 186, 31],
    [249, 202, 50], [245, 217, 73], [242, 232, 101], [243, 245, 134],
    [252, 255, 164],
];

#[rustfmt::skip]
const TURBO_STOPS: [[u8; 3]; STOP_COUNT] = [
    [48, 18, 59], [57, 42, 115], [64, 64, 161], [68, 86, 199],
    [70, 107, 227], [70, 127, 246], [66, 147, 255], [55, 167, 250],
    [41, 187, 236], [29, 205, 216], [24, 220, 195], [30, 232, 176],
    [49, 242, 153], [76, 249, 126], [107, 253, 100], [138, 255, 77],
    [163, 253, 60], [184, 247, 53], [204, 237, 52], [222, 224, 55],
    [237, 208, 58], [248, 192, 58], [253, 174, 53], [254, 152, 44],
    [251, 128, 34], [245, 104, 23], [236, 82, 15], [224, 64, 9],
    [210, 49, 5], [192, 35, 2], [172, 23, 1], [149, 13, 1],
    [122, 4, 3],
];

/// A colormap for heat maps. The discriminants are the shader's colormap ids.
// Keep in sync with shaders/heatmap.wgsl
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[repr(u32)]
pub enum Colormap {
    /// Perceptually uniform dark blue -> green -> yellow (matplotlib's default).
    #[default]
    Viridis = 0,
    /// Perceptually uniform black -> red -> pale yellow.
    Inferno = 1,
    /// Rainbow-like dark blue -> green -> dark red, with more contrast than viridis.
    Turbo = 2,
    /// Black -> white.
    Grey = 3,
}

impl Colormap {
    /// Every colormap, in menu order.
    pub const ALL: [Colormap; 4] = [
        Colormap::Viridis,
        Colormap::Inferno,
        Colormap::Turbo,
        Colormap::Grey,
    ];

    /// The lower-case name used by [`fmt::Display`] and [`FromStr`].
    pub fn name(self) -> &'static str {
        match self {
            Colormap::Viridis => "viridis",
            Colormap::Inferno => "inferno",
            Colormap::Turbo => "turbo",
            Colormap::Grey => "grey",
        }
    }

    /// The colour of `t` (clamped to 0..1; NaN counts as 0) as 8-bit sRGB.
    pub fn rgb(self, t: f32) -> [u8; 3] {
        let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
        let stops = match self {
            Colormap::Viridis => &VIRIDIS_STOPS,
            Colormap::Inferno => &INFERNO_STOPS,
            Colormap::Turbo => &TURBO_STOPS,
            Colormap::Grey => {
                let level = (t * 255.0).round() as u8;
                return [level; 3];
            }
        };
        let position = t * (STOP_COUNT - 1) as f32;
        let low = (position.floor() as usize).min(STOP_COUNT - 2);
        let fraction = position - low as f32;
        let (from, to) = (stops[low], stops[low + 1]);
        std::array::from_fn(|channel| {
            let value =
                f32::from(from[channel]) * (1.0 - fraction) + f32::from(to[channel]) * fraction;
            value.round().clamp(0.0, 255.0) as u8
        })
    }
}

impl fmt::Display for Colormap {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// A colormap name that [`Colormap::from_str`] does not know.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown colormap {name:?} (expected viridis, inferno, turbo or grey)")]
pub struct UnknownColormap {
    /// The name that was given.
    pub name: String,
}

impl FromStr for Colormap {
    type Err = UnknownColormap;

    /// Case-insensitive; accepts `gray` for [`Colormap::Grey`].
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "viridis" => Ok(Colormap::Viridis),
            "inferno" => Ok(Colormap::Inferno),
            "turbo" => Ok(Colormap::Turbo),
            "grey" | "gray" => Ok(Colormap::Grey),
            _ => Err(UnknownColormap {
                name: text.to_string(),
            }),
        }
    }
}

/// Blends a colour-mapped heat map over an image and returns the new RGB image.
///
/// `image_rgb` is `[h, w, 3]` 8-bit RGB; `heatmap` is `[h, w]` in 0..1. Pixels whose heat is below
/// `threshold` keep the image's colour; the others become
/// `image * (1 - opacity) + colormap(heat) * opacity` (`opacity` clamped to 0..1). Pixels missing from
/// a short `image_rgb` or `heatmap` are treated as black and zero heat.
pub fn overlay(
    image_rgb: &[u8],
    w: usize,
    h: usize,
    heatmap: &[f32],
    colormap: Colormap,
    opacity: f32,
    threshold: f32,
) -> Vec<u8> {
    let opacity = if opacity.is_nan() {
        0.0
    } else {
        opacity.clamp(0.0, 1.0)
    };
    let mut out = vec![0u8; w * h * 3];
    for (pixel, out_pixel) in out.chunks_exact_mut(3).enumerate() {
        let base: [u8; 3] =
            std::array::from_fn(|channel| image_rgb.get(pixel * 3 + channel).copied().unwrap_or(0));
        let heat = heatmap.get(pixel).copied().unwrap_or(0.0);
        if heat.is_nan() || heat < threshold {
            out_pixel.copy_from_slice(&base);
            continue;
        }
        let color = colormap.rgb(heat);
        for channel in 0..3 {
            let mixed =
                f32::from(base[channel]) * (1.0 - opacity) + f32::from(color[channel]) * opacity;
            out_pixel[channel] = mixed.round().clamp(0.0, 255.0) as u8;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(actual: [u8; 3], expected: [f32; 3]) -> bool {
        actual
            .iter()
            .zip(expected)
            .all(|(&a, e)| (f32::from(a) - e).abs() <= 2.0)
    }

    #[test]
    fn tables_match_the_published_colormaps() {
        // Reference values: matplotlib's colormap data at these t, times 255.
        assert!(close(Colormap::Viridis.rgb(0.0), [68.1, 1.2, 84.0]));
        assert!(close(Colormap::Viridis.rgb(0.3), [52.5, 95.3, 141.1]));
        assert!(close(Colormap::Viridis.rgb(0.5), [32.7, 144.1, 140.5]));
        assert!(close(Colormap::Viridis.rgb(0.7), [67.2, 190.5, 112.8]));
        assert!(close(Colormap::Viridis.rgb(1.0), [253.3, 231.1, 36.7]));
        assert!(close(Colormap::Inferno.rgb(0.3), [107.0, 23.3, 110.4]));
        assert!(close(Colormap::Inferno.rgb(0.7), [243.1, 118.7, 26.1]));
        assert!(close(Colormap::Turbo.rgb(0.3), [24.6, 214.4, 203.5]));
        assert!(close(Colormap::Turbo.rgb(0.5), [162.8, 252.7, 60.3]));
        assert!(close(Colormap::Turbo.rgb(1.0), [122.3, 4.0, 2.7]));
        assert_eq!(Colormap::Grey.rgb(0.5), [128, 128, 128]);
        assert_eq!(Colormap::Grey.rgb(2.0), [255, 255, 255]);
        assert_eq!(Colormap::Grey.rgb(f32::NAN), [0, 0, 0]);
    }

    #[test]
    fn names_round_trip() {
        for colormap in Colormap::ALL {
            assert_eq!(colormap.to_string().parse::<Colormap>(), Ok(colormap));
        }
        assert_eq!("Gray".parse::<Colormap>(), Ok(Colormap::Grey));
        let error = "jet".parse::<Colormap>().unwrap_err();
        assert!(error.to_string().contains("\"jet\""));
    }

    #[test]
    fn overlay_blends_above_threshold_only() {
        let image = vec![100u8; 2 * 3]; // 2 x 1 pixels
        let heat = [0.2, 1.0];
        let out = overlay(&image, 2, 1, &heat, Colormap::Grey, 0.5, 0.5);
        assert_eq!(&out[0..3], &[100, 100, 100]);
        assert_eq!(&out[3..6], &[178, 178, 178]); // (100 + 255) / 2 = 177.5 -> 178
        let opaque = overlay(&image, 2, 1, &heat, Colormap::Viridis, 1.0, 0.0);
        assert_eq!(&opaque[0..3], &Colormap::Viridis.rgb(0.2));
    }
}

//! Deterministic drawn scenes: 1-3 flat-coloured shapes on a plain background, each with its ground-truth
//! mask and a caption. They are the training data of the bundled model and the ground truth of
//! `attend eval-shapes`, so everything here is a pure function of a seed.
//!
//! Caption grammar (words and colours fixed by the bundled model's vocabulary):
//! `a {colour} {shape}[ and a {colour} {shape}[ and a {colour} {shape}]][ on a {colour} background]`,
//! with "an" before "orange".

use std::fmt;
use std::str::FromStr;

/// The shapes a scene can hold.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    /// A disc.
    Circle,
    /// An axis-aligned square.
    Square,
    /// An equilateral triangle pointing up.
    Triangle,
    /// A five-pointed star pointing up.
    Star,
}

impl Shape {
    /// Every shape, in caption-vocabulary order.
    pub const ALL: [Shape; 4] = [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Star];

    /// The caption word.
    pub fn word(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.word())
    }
}

impl FromStr for Shape {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Shape::ALL
            .into_iter()
            .find(|shape| shape.word().eq_ignore_ascii_case(text))
            .ok_or_else(|| {
                format!("unknown shape {text:?} (expected circle, square, triangle or star)")
            })
    }
}

/// The palette of object and background colours.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    /// (220, 40, 40)
    Red,
    /// (40, 170, 60)
    Green,
    /// (40, 80, 220)
    Blue,
    /// (240, 210, 40)
    Yellow,
    /// (140, 60, 180)
    Purple,
    /// (245, 140, 30)
    Orange,
    /// (245, 245, 245)
    White,
    /// (20, 20, 20)
    Black,
}

impl Colour {
    /// Every colour, in caption-vocabulary order.
    pub const ALL: [Colour; 8] = [
        Colour::Red,
        Colour::Green,
        Colour::Blue,
        Colour::Yellow,
        Colour::Purple,
        Colour::Orange,
        Colour::White,
        Colour::Black,
    ];

    /// The caption word.
    pub fn word(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Purple => "purple",
            Colour::Orange => "orange",
            Colour::White => "white",
            Colour::Black => "black",
        }
    }

    /// The palette RGB value (before jitter).
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 40, 40],
            Colour::Green => [40, 170, 60],
            Colour::Blue => [40, 80, 220],
            Colour::Yellow => [240, 210, 40],
            Colour::Purple => [140, 60, 180],
            Colour::Orange => [245, 140, 30],
            Colour::White => [245, 245, 245],
            Colour::Black => [20, 20, 20],
        }
    }

    /// "a" or "an" before this colour's word.
    pub fn article(self) -> &'static str {
        if self == Colour::Orange {
            "an"
        } else {
            "a"
        }
    }

    /// The palette colour nearest to `rgb` (squared RGB distance).
    pub fn nearest(rgb: [u8; 3]) -> (Colour, u32) {
        Colour::ALL
            .into_iter()
            .map(|colour| (colour, rgb_distance_sq(rgb, colour.rgb())))
            .min_by_key(|&(_, distance)| distance)
            .unwrap_or((Colour::White, u32::MAX))
    }
}

impl fmt::Display for Colour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.word())
    }
}

impl FromStr for Colour {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Colour::ALL
            .into_iter()
            .find(|colour| colour.word().eq_ignore_ascii_case(text))
            .ok_or_else(|| format!("unknown colour {text:?}"))
    }
}

/// Squared Euclidean distance between two RGB colours.
pub fn rgb_distance_sq(a: [u8; 3], b: [u8; 3]) -> u32 {
    a.iter()
        .zip(b)
        .map(|(&x, y)| {
            let d = i32::from(x) - i32::from(y);
            d.unsigned_abs() * d.unsigned_abs()
        })
        .sum()
}

/// One object of a scene.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SceneObject {
    /// Its shape.
    pub shape: Shape,
    /// Its palette colour.
    pub colour: Colour,
    /// The jittered RGB actually drawn.
    pub rgb: [u8; 3],
    /// Centre in pixels (x, y).
    pub centre_px: (f32, f32),
    /// Side of the bounding square in pixels.
    pub size_px: f32,
}

/// A drawn scene: the image, one visible-pixel mask per object, and its caption.
#[derive(Clone, Debug)]
pub struct Scene {
    /// Image side in pixels (square images).
    pub size_px: usize,
    /// Background palette colour.
    pub background: Colour,
    /// The objects, in caption order (later ones are drawn on top).
    pub objects: Vec<SceneObject>,
    /// The caption.
    pub caption: String,
    /// RGB, row-major `[size, size, 3]`.
    pub rgb: Vec<u8>,
    /// Per object, row-major `[size, size]`: true where that object is the visible (topmost) one
    /// covering at least half the pixel.
    pub masks: Vec<Vec<bool>>,
}

/// Options of the generator.
#[derive(Clone, Debug)]
pub struct SceneOptions {
    /// Image side in pixels.
    pub size_px: usize,
    /// Probability that a white background is named in the caption (other backgrounds always are).
    pub name_white_background: f64,
    /// Probability that the background is not white.
    pub coloured_background: f64,
}

impl Default for SceneOptions {
    fn default() -> Self {
        Self {
            size_px: 64,
            name_white_background: 0.3,
            coloured_background: 0.4,
        }
    }
}

/// A small deterministic generator (SplitMix64), identical on every platform.
#[derive(Clone, Debug)]
pub struct SceneRng(u64);

impl SceneRng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x5EED_5CE4_E5A7_7E4D)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        #[allow(clippy::cast_precision_loss)]
        let value = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        value
    }

    /// Uniform in [low, high).
    pub fn range(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.unit()
    }

    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let index = (self.unit() * n as f64) as usize;
        index.min(n.saturating_sub(1))
    }
}

/// Whether the point (x, y) lies inside the object's shape.
fn shape_contains(object: &SceneObject, x: f32, y: f32) -> bool {
    let (cx, cy) = object.centre_px;
    let half = object.size_px / 2.0;
    let dx = x - cx;
    let dy = y - cy;
    match object.shape {
        Shape::Circle => dx * dx + dy * dy <= half * half,
        Shape::Square => dx.abs() <= half && dy.abs() <= half,
        Shape::Triangle => {
            // Equilateral, pointing up, inscribed in the bounding square horizontally.
            let height = object.size_px * 0.866;
            let top = cy - height / 2.0;
            let bottom = cy + height / 2.0;
            if y < top || y > bottom {
                return false;
            }
            let half_width_here = half * (y - top) / height;
            dx.abs() <= half_width_here
        }
        Shape::Star => point_in_star(dx, dy, half, half * 0.45),
    }
}

/// Five-pointed star, pointing up, outer radius `outer`, inner radius `inner`.
fn point_in_star(dx: f32, dy: f32, outer: f32, inner: f32) -> bool {
    let vertices: Vec<(f32, f32)> = (0..10)
        .map(|i| {
            #[allow(clippy::cast_precision_loss)]
            let angle = -std::f32::consts::FRAC_PI_2 + i as f32 * std::f32::consts::PI / 5.0;
            let radius = if i % 2 == 0 { outer } else { inner };
            (radius * angle.cos(), radius * angle.sin())
        })
        .collect();
    // Even-odd ray casting.
    let mut inside = false;
    let mut j = vertices.len() - 1;
    for i in 0..vertices.len() {
        let (xi, yi) = vertices[i];
        let (xj, yj) = vertices[j];
        if (yi > dy) != (yj > dy) && dx < (xj - xi) * (dy - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// Samples per pixel side for anti-aliasing.
const SUPERSAMPLE: usize = 4;

/// Generate scene number `seed` deterministically.
pub fn generate_scene(seed: u64, options: &SceneOptions) -> Scene {
    let mut rng = SceneRng::new(seed);
    let size = options.size_px;
    #[allow(clippy::cast_precision_loss)]
    let side = size as f32;

    let background = if rng.unit() < options.coloured_background {
        Colour::ALL[rng.below(Colour::ALL.len())]
    } else {
        Colour::White
    };
    let object_count = 1 + rng.below(3);
    let mut used_colours = vec![background];
    let mut objects: Vec<SceneObject> = Vec::with_capacity(object_count);
    for _ in 0..object_count {
        let available: Vec<Colour> = Colour::ALL
            .into_iter()
            .filter(|c| !used_colours.contains(c))
            .collect();
        let colour = available[rng.below(available.len())];
        used_colours.push(colour);
        let shape = Shape::ALL[rng.below(Shape::ALL.len())];
        let rgb = jitter(colour.rgb(), &mut rng);
        // Place with small overlap: try a few positions, keep the one with the least overlap.
        let mut best: Option<(f32, SceneObject)> = None;
        for _ in 0..40 {
            #[allow(clippy::cast_possible_truncation)]
            let size_px = (rng.range(0.22, 0.40) as f32) * side;
            let margin = size_px / 2.0 + 1.0;
            #[allow(clippy::cast_possible_truncation)]
            let centre_px = (
                rng.range(f64::from(margin), f64::from(side - margin)) as f32,
                rng.range(f64::from(margin), f64::from(side - margin)) as f32,
            );
            let candidate = SceneObject {
                shape,
                colour,
                rgb,
                centre_px,
                size_px,
            };
            let overlap = objects
                .iter()
                .map(|other| {
                    let distance = ((other.centre_px.0 - centre_px.0).powi(2)
                        + (other.centre_px.1 - centre_px.1).powi(2))
                    .sqrt();
                    ((other.size_px + size_px) / 2.0 - distance).max(0.0)
                })
                .fold(0.0_f32, f32::max);
            if best.as_ref().is_none_or(|(o, _)| overlap < *o) {
                best = Some((overlap, candidate));
            }
            if overlap <= 0.0 {
                break;
            }
        }
        if let Some((_, object)) = best {
            objects.push(object);
        }
    }

    let mut caption = objects
        .iter()
        .map(|o| {
            format!(
                "{} {} {}",
                o.colour.article(),
                o.colour.word(),
                o.shape.word()
            )
        })
        .collect::<Vec<_>>()
        .join(" and ");
    if background != Colour::White || rng.unit() < options.name_white_background {
        caption.push_str(&format!(
            " on {} {} background",
            background.article(),
            background.word()
        ));
    }

    let background_rgb = jitter(background.rgb(), &mut rng);
    let (rgb, masks) = render(size, background_rgb, &objects);
    Scene {
        size_px: size,
        background,
        objects,
        caption,
        rgb,
        masks,
    }
}

/// Small per-object colour jitter (+-8 per channel).
fn jitter(rgb: [u8; 3], rng: &mut SceneRng) -> [u8; 3] {
    rgb.map(|channel| {
        #[allow(clippy::cast_possible_truncation)]
        let offset = rng.range(-8.0, 8.0).round() as i32;
        #[allow(clippy::cast_sign_loss, clippy::cast_possible_truncation)]
        let value = (i32::from(channel) + offset).clamp(0, 255) as u8;
        value
    })
}

/// Anti-aliased rendering; returns the RGB image and per-object visible masks.
fn render(size: usize, background: [u8; 3], objects: &[SceneObject]) -> (Vec<u8>, Vec<Vec<bool>>) {
    let mut rgb = vec![0u8; size * size * 3];
    let mut masks = vec![vec![false; size * size]; objects.len()];
    let samples = SUPERSAMPLE * SUPERSAMPLE;
    let mut coverage = vec![0usize; objects.len() + 1];
    for y in 0..size {
        for x in 0..size {
            coverage.iter_mut().for_each(|c| *c = 0);
            for sy in 0..SUPERSAMPLE {
                for sx in 0..SUPERSAMPLE {
                    #[allow(clippy::cast_precision_loss)]
                    let px = x as f32 + (sx as f32 + 0.5) / SUPERSAMPLE as f32;
                    #[allow(clippy::cast_precision_loss)]
                    let py = y as f32 + (sy as f32 + 0.5) / SUPERSAMPLE as f32;
                    // Topmost object covering the sample, else background (index 0).
                    let top = objects
                        .iter()
                        .rposition(|object| shape_contains(object, px, py))
                        .map_or(0, |index| index + 1);
                    coverage[top] += 1;
                }
            }
            let mut accumulated = [0usize; 3];
            for (index, &count) in coverage.iter().enumerate() {
                let colour = if index == 0 {
                    background
                } else {
                    objects[index - 1].rgb
                };
                for channel in 0..3 {
                    accumulated[channel] += usize::from(colour[channel]) * count;
                }
                if index > 0 && count * 2 >= samples {
                    masks[index - 1][y * size + x] = true;
                }
            }
            for channel in 0..3 {
                #[allow(clippy::cast_possible_truncation)]
                let value = ((accumulated[channel] + samples / 2) / samples) as u8;
                rgb[(y * size + x) * 3 + channel] = value;
            }
        }
    }
    (rgb, masks)
}

/// The words of the bundled model's vocabulary (besides special tokens), in id order.
pub fn vocabulary_words() -> Vec<&'static str> {
    let mut words = vec![
        "a",
        "an",
        "and",
        "on",
        "background",
        "with",
        "the",
        ",",
        ".",
    ];
    words.extend(Shape::ALL.map(Shape::word));
    words.extend(Colour::ALL.map(Colour::word));
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_scene_and_different_seeds_differ() {
        let options = SceneOptions::default();
        let first = generate_scene(7, &options);
        let again = generate_scene(7, &options);
        assert_eq!(first.rgb, again.rgb);
        assert_eq!(first.caption, again.caption);
        assert_eq!(first.masks, again.masks);
        let other = generate_scene(8, &options);
        assert_ne!(first.rgb, other.rgb);
    }

    #[test]
    fn captions_follow_the_grammar_and_agree_with_masks() {
        let options = SceneOptions::default();
        for seed in 0..300 {
            let scene = generate_scene(seed, &options);
            assert!((1..=3).contains(&scene.objects.len()));
            let parts: Vec<&str> = scene.caption.split(" on ").collect();
            let object_phrases: Vec<&str> = parts[0].split(" and ").collect();
            assert_eq!(
                object_phrases.len(),
                scene.objects.len(),
                "{}",
                scene.caption
            );
            for (phrase, object) in object_phrases.iter().zip(&scene.objects) {
                let words: Vec<&str> = phrase.split(' ').collect();
                assert_eq!(
                    words,
                    [
                        object.colour.article(),
                        object.colour.word(),
                        object.shape.word()
                    ]
                );
            }
            if parts.len() == 2 {
                assert_eq!(
                    parts[1],
                    format!(
                        "{} {} background",
                        scene.background.article(),
                        scene.background
                    )
                );
            } else {
                assert_eq!(scene.background, Colour::White);
            }
            // Colours distinct from each other and from the background.
            let mut colours: Vec<Colour> = scene.objects.iter().map(|o| o.colour).collect();
            colours.push(scene.background);
            let count = colours.len();
            colours.sort();
            colours.dedup();
            assert_eq!(colours.len(), count);
            // Every mask is non-empty, its pixels have (nearly) the object's colour.
            for (object, mask) in scene.objects.iter().zip(&scene.masks) {
                let pixels: Vec<usize> = (0..mask.len()).filter(|&i| mask[i]).collect();
                assert!(
                    pixels.len() > 20,
                    "seed {seed}: tiny mask for {}",
                    object.shape
                );
                let matching = pixels
                    .iter()
                    .filter(|&&i| {
                        let pixel = [scene.rgb[i * 3], scene.rgb[i * 3 + 1], scene.rgb[i * 3 + 2]];
                        Colour::nearest(pixel).0 == object.colour
                    })
                    .count();
                // Anti-aliased edge pixels blend with what lies beneath; the bulk must match.
                assert!(
                    matching * 4 >= pixels.len() * 3,
                    "seed {seed}: mask/colour disagree ({matching} of {} pixels)",
                    pixels.len()
                );
            }
        }
    }

    #[test]
    fn shape_fill_ratios_differ() {
        // Fill ratio of the mask within its bounding box separates the shapes.
        let fill = |shape: Shape| {
            let object = SceneObject {
                shape,
                colour: Colour::Red,
                rgb: [220, 40, 40],
                centre_px: (32.0, 32.0),
                size_px: 30.0,
            };
            let (_, masks) = render(64, [245, 245, 245], std::slice::from_ref(&object));
            let count = masks[0].iter().filter(|&&m| m).count();
            #[allow(clippy::cast_precision_loss)]
            let ratio = count as f32 / (30.0 * 30.0);
            ratio
        };
        assert!(fill(Shape::Square) > 0.9);
        assert!((0.7..0.85).contains(&fill(Shape::Circle)));
        assert!(fill(Shape::Triangle) < 0.5);
        assert!(fill(Shape::Star) < 0.35);
    }
}

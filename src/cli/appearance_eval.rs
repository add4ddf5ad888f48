//! `attend appearance-eval`: measures appearance transfer on the bundled model over drawn pairs it
//! never saw (scene seeds below the training range). A pair is a structure scene and an
//! appearance scene with the same object kinds in the same caption order, other colours, other
//! places and another background. Per pair:
//! - **fully right**: every structure object is found in the output in its matching appearance
//!   object's colour, with the structure's shape (the shape test of `attend eval-shapes`) at the
//!   structure's place (IoU with the structure's object mask at least [`MIN_PLACE_IOU`]), and the
//!   output's background is the appearance's;
//! - **correspondence**: the share of the output's object pixels (the structure's object masks)
//!   whose most-attended appearance pixel lies in the matching appearance object;
//! - **seconds** of the whole transfer (both inversions, segmentation, the run, decoding).
//!
//! Tuning pairs and held-out pairs come from disjoint seed ranges and are reported apart.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use attend::analysis::appearance::Correspondence;
use attend::analysis::export::{write_atomically, write_png_rgb};
use attend::analysis::scene_check::{background_colour, find_object, iou, palette_labels};
use attend::attention::appearance_sampling::{
    transfer_appearance, AppearanceTransferOutput, AppearanceTransferRequest,
};
use attend::hook::CancelToken;
use attend::pipeline::model::StableDiffusion;
use attend::pipeline::sampling::RgbImage;
use attend::scenes::{generate_scene, Scene, SceneOptions};

use super::appearance_transfer::TransferFlags;
use super::checks::{at_least_one, non_negative, OutDir};
use super::style_aligned::image_row;
use super::{load_model, ModelArgs};

/// An output object must overlap the structure's object by at least this IoU to be "in place".
pub const MIN_PLACE_IOU: f32 = 0.5;

/// Scene seeds at or above this were used to train the bundled model.
const TRAINING_SEEDS_FROM: u64 = 1_000_000;

/// Seeds per pair of a range: structure and appearance scenes of a range come from its
/// `RANGE_SEEDS_PER_PAIR * pairs` seeds, so tuning and held-out ranges share no scene.
const RANGE_SEEDS_PER_PAIR: u64 = 1000;

/// How many candidate seeds are searched for a structure scene's appearance partner.
const PARTNER_SEARCH: u64 = 20_000;

/// Arguments of `attend appearance-eval`.
#[derive(Debug, clap::Args)]
pub struct AppearanceEvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Pairs per seed range.
    #[arg(long, default_value_t = 10, value_parser = at_least_one, allow_negative_numbers = true)]
    pub pairs: usize,
    /// First structure seed of the tuning pairs.
    #[arg(long, default_value_t = 0, value_parser = non_negative, allow_negative_numbers = true)]
    pub tuning_start: u64,
    /// First structure seed of the held-out pairs (must not overlap the tuning range).
    #[arg(long, default_value_t = 500_000, value_parser = non_negative, allow_negative_numbers = true)]
    pub held_out_start: u64,
    /// Run only the tuning pairs.
    #[arg(long)]
    pub tuning_only: bool,
    #[command(flatten)]
    pub transfer: TransferFlags,
    /// Write each pair's strip (structure, appearance, output, structure reconstruction) here.
    #[arg(long)]
    pub images_out: Option<PathBuf>,
    /// Write the JSON summary to this file too (it is always printed).
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

/// A structure scene and its appearance partner; `matches[i]` is the appearance object of
/// structure object `i`.
struct Pair {
    structure_seed: u64,
    appearance_seed: u64,
    structure: Scene,
    appearance: Scene,
}

/// At most two objects per scene (a partner with the same kinds is then found quickly).
fn usable(scene: &Scene) -> bool {
    (1..=2).contains(&scene.objects.len())
}

/// The first scene from `structure_seed` on with 1 or 2 objects, and a partner from the seeds
/// `range` (searched from a point that depends on the structure's seed) with the same shapes in
/// order, other colours and another background.
fn find_pair(structure_seed: u64, range: std::ops::Range<u64>) -> Option<Pair> {
    let options = SceneOptions::default();
    let span = range.end - range.start;
    for seed in structure_seed..range.end {
        let structure = generate_scene(seed, &options);
        if !usable(&structure) {
            continue;
        }
        let search_start = seed.wrapping_mul(7919) % span;
        for offset in 0..PARTNER_SEARCH.min(span) {
            let candidate = range.start + (search_start + offset) % span;
            if candidate == seed {
                continue;
            }
            let appearance = generate_scene(candidate, &options);
            let same_kinds = appearance.objects.len() == structure.objects.len()
                && appearance
                    .objects
                    .iter()
                    .zip(&structure.objects)
                    .all(|(a, s)| a.shape == s.shape && a.colour != s.colour);
            let no_colour_shared = appearance.objects.iter().all(|a| {
                structure.objects.iter().all(|s| s.colour != a.colour)
                    && a.colour != structure.background
            });
            if same_kinds && no_colour_shared && appearance.background != structure.background {
                return Some(Pair {
                    structure_seed: seed,
                    appearance_seed: candidate,
                    structure,
                    appearance,
                });
            }
        }
    }
    None
}

fn scene_image(scene: &Scene) -> RgbImage {
    RgbImage {
        width: scene.size_px,
        height: scene.size_px,
        pixels: scene.rgb.clone(),
    }
}

/// What one pair's output shows.
#[derive(Clone, Debug, Default, serde::Serialize)]
struct Verdict {
    objects_right: usize,
    objects: usize,
    background_right: bool,
    fully_right: bool,
    /// Output object pixels whose most-attended appearance pixel is in the matching object.
    corresponding_pixels: usize,
    /// Output object pixels judged.
    object_pixels: usize,
    seconds: f64,
}

fn judge(pair: &Pair, output: &AppearanceTransferOutput, seconds: f64) -> Verdict {
    let image = &output.output;
    let (width, height) = (image.width, image.height);
    let labels = palette_labels(&image.pixels, width, height);
    let mut verdict = Verdict {
        objects: pair.structure.objects.len(),
        seconds,
        ..Verdict::default()
    };
    for (index, (structure_object, appearance_object)) in pair
        .structure
        .objects
        .iter()
        .zip(&pair.appearance.objects)
        .enumerate()
    {
        let right =
            find_object(&labels, width, height, appearance_object.colour).is_some_and(|region| {
                region.shape == structure_object.shape
                    && iou(&region.mask, &pair.structure.masks[index]) >= MIN_PLACE_IOU
            });
        verdict.objects_right += usize::from(right);
        let (corresponding, pixels) = correspondence_hits(
            &output.correspondence,
            &pair.structure.masks[index],
            &pair.appearance.masks[index],
            width,
        );
        verdict.corresponding_pixels += corresponding;
        verdict.object_pixels += pixels;
    }
    verdict.background_right =
        background_colour(&labels, width, height) == Some(pair.appearance.background);
    verdict.fully_right = verdict.background_right && verdict.objects_right == verdict.objects;
    verdict
}

/// `(hits, pixels)`: of the pixels in `structure_mask`, how many have their most-attended
/// appearance pixel inside `appearance_mask`.
fn correspondence_hits(
    correspondence: &Correspondence,
    structure_mask: &[bool],
    appearance_mask: &[bool],
    width: usize,
) -> (usize, usize) {
    let mut hits = 0;
    let mut pixels = 0;
    for (index, _) in structure_mask
        .iter()
        .enumerate()
        .filter(|(_, &inside)| inside)
    {
        pixels += 1;
        let (y, x) = (index / width, index % width);
        let hit = correspondence
            .query_at_pixel(y, x)
            .and_then(|query| correspondence.top_pixel_for(query))
            .is_some_and(|(top_y, top_x)| appearance_mask[top_y * width + top_x]);
        hits += usize::from(hit);
    }
    (hits, pixels)
}

/// Shares over a seed range.
#[derive(Clone, Debug, Default)]
struct Tally {
    pairs: usize,
    fully_right: usize,
    objects: usize,
    objects_right: usize,
    background_right: usize,
    corresponding_pixels: usize,
    object_pixels: usize,
    seconds: Vec<f64>,
}

impl Tally {
    fn add(&mut self, verdict: &Verdict) {
        self.pairs += 1;
        self.fully_right += usize::from(verdict.fully_right);
        self.objects += verdict.objects;
        self.objects_right += verdict.objects_right;
        self.background_right += usize::from(verdict.background_right);
        self.corresponding_pixels += verdict.corresponding_pixels;
        self.object_pixels += verdict.object_pixels;
        self.seconds.push(verdict.seconds);
    }

    fn summary(&self) -> serde_json::Value {
        let share = |count: usize, total: usize| count as f64 / total.max(1) as f64;
        let mut seconds = self.seconds.clone();
        seconds.sort_by(f64::total_cmp);
        serde_json::json!({
            "pairs": self.pairs,
            "fully_right": share(self.fully_right, self.pairs),
            "objects_right": share(self.objects_right, self.objects),
            "background_right": share(self.background_right, self.pairs),
            "correspondence_in_matching_object": share(self.corresponding_pixels, self.object_pixels),
            "median_seconds_per_transfer": seconds.get(seconds.len() / 2).copied().unwrap_or(0.0),
            "mean_seconds_per_transfer": seconds.iter().sum::<f64>() / seconds.len().max(1) as f64,
        })
    }
}

/// Run `attend appearance-eval`.
pub fn run(args: &AppearanceEvalArgs) -> anyhow::Result<()> {
    let settings = args.transfer.settings()?;
    let range_span = RANGE_SEEDS_PER_PAIR * args.pairs as u64;
    anyhow::ensure!(
        args.held_out_start >= args.tuning_start + range_span
            || args.held_out_start + range_span <= args.tuning_start,
        "--held-out-start {} overlaps the tuning seeds from {} (keep them at least {} apart)",
        args.held_out_start,
        args.tuning_start,
        range_span
    );
    anyhow::ensure!(
        args.tuning_start.max(args.held_out_start) + range_span <= TRAINING_SEEDS_FROM,
        "seeds from {TRAINING_SEEDS_FROM} on were used to train the bundled model; start lower"
    );
    let mut images_out = args
        .images_out
        .as_deref()
        .map(|dir| OutDir::check("--images-out", dir))
        .transpose()?;
    if let Some(path) = &args.json_out {
        super::checks::check_output_file("--json-out", path)?;
    }
    let model = load_model(&args.model)?;
    let images_dir = match &mut images_out {
        Some(dir) => Some(dir.create()?.to_path_buf()),
        None => None,
    };
    let mut ranges = vec![("tuning", args.tuning_start)];
    if !args.tuning_only {
        ranges.push(("held_out", args.held_out_start));
    }
    let mut summaries = serde_json::Map::new();
    let mut per_pair = Vec::new();
    for (name, start) in ranges {
        let mut tally = Tally::default();
        let mut next_seed = start;
        for index in 0..args.pairs {
            let pair = find_pair(next_seed, start..start + range_span)
                .ok_or_else(|| anyhow::anyhow!("no usable pair from seed {next_seed}"))?;
            next_seed = pair.structure_seed + 1;
            let request = AppearanceTransferRequest {
                structure: scene_image(&pair.structure),
                structure_prompt: pair.structure.caption.clone(),
                appearance: scene_image(&pair.appearance),
                appearance_prompt: pair.appearance.caption.clone(),
                settings: settings.clone(),
                seed: pair.structure_seed,
            };
            let (output, seconds) = run_pair(&model, &request)?;
            let verdict = judge(&pair, &output, seconds);
            tally.add(&verdict);
            eprintln!(
                "[{name} {}/{}] {} \"{}\" <- {} \"{}\": objects {}/{}, background {}, \
                 correspondence {}/{}, {:.1} s",
                index + 1,
                args.pairs,
                pair.structure_seed,
                pair.structure.caption,
                pair.appearance_seed,
                pair.appearance.caption,
                verdict.objects_right,
                verdict.objects,
                if verdict.background_right {
                    "right"
                } else {
                    "wrong"
                },
                verdict.corresponding_pixels,
                verdict.object_pixels,
                seconds
            );
            if let Some(dir) = images_dir.as_deref() {
                let strip = image_row(&[
                    &request.structure,
                    &request.appearance,
                    &output.output,
                    &output.structure_reconstruction,
                ])?;
                write_png_rgb(
                    &dir.join(format!(
                        "{name}_{:06}_{:06}.png",
                        pair.structure_seed, pair.appearance_seed
                    )),
                    strip.width,
                    strip.height,
                    &strip.pixels,
                    None,
                )?;
            }
            per_pair.push(serde_json::json!({
                "range": name,
                "structure_seed": pair.structure_seed,
                "structure_caption": pair.structure.caption,
                "appearance_seed": pair.appearance_seed,
                "appearance_caption": pair.appearance.caption,
                "verdict": verdict,
                "masks": output.masks.structure.iter().map(|mask| &mask.label).collect::<Vec<_>>(),
            }));
        }
        summaries.insert(name.to_string(), tally.summary());
    }
    let summary = serde_json::json!({
        "model": model.dir().display().to_string(),
        "settings": settings,
        "tuning_start": args.tuning_start,
        "held_out_start": (!args.tuning_only).then_some(args.held_out_start),
        "pairs_per_range": args.pairs,
        "results": summaries,
        "per_pair": per_pair,
    });
    let text = serde_json::to_string_pretty(&summary)?;
    println!("{text}");
    if let Some(path) = &args.json_out {
        write_atomically(path, |file| file.write_all(text.as_bytes()))?;
    }
    if let Some(dir) = images_out {
        dir.keep();
    }
    Ok(())
}

fn run_pair(
    model: &StableDiffusion,
    request: &AppearanceTransferRequest,
) -> anyhow::Result<(AppearanceTransferOutput, f64)> {
    let started = Instant::now();
    let output = transfer_appearance(model, request, &mut |_| Ok(()), &CancelToken::new())?;
    Ok((output, started.elapsed().as_secs_f64()))
}

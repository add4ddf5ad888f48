//! `attend segment`: generate an image, segment it from its self-attention, label the segments with
//! prompt words, and write the image, the label map, the segments and one mask per segment. The
//! generation and segmentation steps here are shared with `attend segment-eval`
//! (`segment_eval.rs`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use attend::analysis::export::{a1111_parameters, write_png_rgb};
use attend::analysis::heatmap::UnetPlace;
use attend::analysis::heatmap::{
    word_heatmaps, AggregationSettings, Heatmap, SelfAttentionMap, SelfAttentionSpan,
};
use attend::analysis::segment::{
    check_fraction, check_k_for_grid, is_label_candidate, mask_file_name, segment_and_label,
    set_prompt_word_indices, write_label_map_png, write_mask_png, write_segments_json,
    CellAssignment, DiffSegSettings, KMeansSettings, LabelChoice, LabelSettings,
    LabelledSegmentation, MaskSettings, SegmentMethod, SegmentSettings, SegmentsFile, WordMapRef,
};
use attend::analysis::WordSpan;
use attend::attention::store::{AttentionStore, StoreConfig};
use attend::hook::CancelToken;
use attend::pipeline::model::StableDiffusion;
use attend::pipeline::sampling::{generate, GenerateOutput, GenerateRequest};

use attend::pipeline::unet::config::DownBlockKind;

use super::checks::{
    at_least_one, non_negative, segmentation_flag_error, warn_unknown_words, OutDir,
};
use super::images::{replay_given_image, ImageArgs};
use super::{load_model, ModelArgs};

/// How to segment and label; shared by `attend segment` and `attend segment-eval`.
#[derive(Debug, Clone, clap::Args)]
pub struct SegmentationArgs {
    /// Clustering: kmeans (needs --k) or diffseg (finds the number of segments).
    #[arg(long, default_value = "kmeans")]
    pub method: SegmentMethod,
    /// KMeans: number of clusters (the most segments: near-identical clusters merge).
    /// At most 256, and at most the cells of the largest self-attention grid kept.
    #[arg(long, default_value_t = 5, value_parser = at_least_one, allow_negative_numbers = true)]
    pub k: usize,
    /// KMeans: seeded runs, the best kept.
    #[arg(long, default_value_t = 10, value_parser = at_least_one, allow_negative_numbers = true)]
    pub n_init: usize,
    /// KMeans: seed of the initialisation.
    #[arg(long, default_value_t = 1, value_parser = non_negative, allow_negative_numbers = true)]
    pub kmeans_seed: u64,
    /// KMeans: merge clusters whose centres differ by less than this fraction of the largest
    /// divergence between centres (0: keep all k).
    #[arg(long, default_value_t = 0.05, allow_hyphen_values = true)]
    pub merge_fraction: f32,
    /// KMeans: clusters smaller than this fraction of the grid (outline slivers) join their
    /// nearest cluster (0: keep all).
    #[arg(long, default_value_t = 0.01, allow_hyphen_values = true)]
    pub min_segment_fraction: f32,
    /// DiffSeg: maps merge when their symmetric KL divergence is below this fraction of the 95th
    /// percentile of the divergences between anchors.
    #[arg(long, default_value_t = 0.25, allow_hyphen_values = true)]
    pub kl_relative: f32,
    /// DiffSeg: an absolute merge threshold instead of --kl-relative (DiffSeg's own: 0.9, tuned on
    /// SD's 64x64 maps).
    #[arg(long, allow_hyphen_values = true)]
    pub kl_threshold: Option<f32>,
    /// DiffSeg: give each cell the proposal with the most attention at it (DiffSeg's rule) instead
    /// of the proposal nearest to the cell's own attention.
    #[arg(long)]
    pub argmax_cells: bool,
    /// DiffSeg: merge passes.
    #[arg(long, default_value_t = 3, value_parser = at_least_one, allow_negative_numbers = true)]
    pub passes: usize,
    /// A segment takes its best word only when the word's score is above this; else "background".
    #[arg(long, default_value_t = 0.3, allow_hyphen_values = true)]
    pub label_threshold: f32,
    /// Among the words above the threshold: most-attention (the word with the most raw
    /// cross-attention over the segment) or highest-score (local-prompt-mixing's rule).
    #[arg(long, default_value = "most-attention")]
    pub label_choice: LabelChoice,
    /// Words that compete for labels, comma-separated (default: the prompt's words without
    /// function words and colour names).
    #[arg(long, value_delimiter = ',')]
    pub words: Option<Vec<String>>,
    /// Self-attention of the last step only instead of the mean over all steps.
    #[arg(long)]
    pub last_step_only: bool,
}

impl SegmentationArgs {
    /// The library settings these arguments describe.
    fn settings(&self) -> SegmentSettings {
        SegmentSettings {
            method: self.method,
            kmeans: KMeansSettings {
                k: self.k,
                n_init: self.n_init,
                seed: self.kmeans_seed,
                merge_fraction: (self.merge_fraction > 0.0).then_some(self.merge_fraction),
                min_segment_fraction: (self.min_segment_fraction > 0.0)
                    .then_some(self.min_segment_fraction),
                ..KMeansSettings::default()
            },
            diffseg: DiffSegSettings {
                kl_threshold: self
                    .kl_threshold
                    .unwrap_or(DiffSegSettings::reference().kl_threshold),
                relative_threshold: match self.kl_threshold {
                    Some(_) => None,
                    None => Some(self.kl_relative),
                },
                passes: self.passes,
                cell_assignment: if self.argmax_cells {
                    CellAssignment::ProposalArgmax
                } else {
                    CellAssignment::NearestProposal
                },
                ..DiffSegSettings::default()
            },
            labels: LabelSettings {
                threshold: self.label_threshold,
                choice: self.label_choice,
                ..LabelSettings::default()
            },
        }
    }

    /// Checks every segmentation flag (ranges, finiteness) before any work, naming the flag.
    pub(super) fn check(&self) -> anyhow::Result<()> {
        if let Some(threshold) = self.kl_threshold {
            anyhow::ensure!(
                threshold.is_finite() && threshold >= 0.0,
                "invalid --kl-threshold: {threshold} must be finite and at least 0 \
                 (a symmetric KL divergence; DiffSeg uses 0.9)"
            );
        }
        check_fraction("merge fraction", self.merge_fraction).map_err(segmentation_flag_error)?;
        check_fraction("min segment fraction", self.min_segment_fraction)
            .map_err(segmentation_flag_error)?;
        self.settings()
            .validate()
            .map_err(segmentation_flag_error)?;
        if let Some(words) = &self.words {
            anyhow::ensure!(
                words.iter().any(|word| !word.trim().is_empty()),
                "--words names no word"
            );
        }
        Ok(())
    }

    /// Checks what depends on the model and the image size, before generating: some
    /// self-attention grid is kept at this size, and KMeans' k fits the largest one.
    pub(super) fn check_for_model(
        &self,
        model: &StableDiffusion,
        width: usize,
        height: usize,
    ) -> anyhow::Result<()> {
        let Some((grid_h, grid_w)) = largest_kept_self_attention_grid(model, width, height) else {
            anyhow::bail!(
                "no self-attention to segment: at {width}x{height} px every attention layer of {} \
                 has a grid larger than {} cells per side, the largest kept",
                model.name(),
                StoreConfig::default().self_max_side
            );
        };
        if self.method == SegmentMethod::KMeans {
            check_k_for_grid(self.k, grid_h, grid_w).map_err(segmentation_flag_error)?;
        }
        Ok(())
    }

    fn span(&self) -> SelfAttentionSpan {
        if self.last_step_only {
            SelfAttentionSpan::LatestStep
        } else {
            SelfAttentionSpan::MeanOverSteps
        }
    }
}

/// Arguments of `attend segment`.
#[derive(Debug, clap::Args)]
pub struct SegmentArgs {
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = 0, value_parser = non_negative, allow_negative_numbers = true)]
    pub seed: u64,
    /// Denoising steps.
    #[arg(long, default_value_t = 20, value_parser = at_least_one, allow_negative_numbers = true)]
    pub steps: usize,
    /// Classifier-free guidance scale (default: the generate default).
    #[arg(long, allow_hyphen_values = true)]
    pub guidance: Option<f64>,
    #[command(flatten)]
    pub segmentation: SegmentationArgs,
    /// Segment a given image instead of a generated one: `--prompt` describes it, the run replays
    /// its inversion while storing attention, `image.png` is its reconstruction.
    #[command(flatten)]
    pub image: ImageArgs,
    /// Masks: grow each mask by this many pixels (negative: shrink); at most the image's longer side.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub dilate_px: i32,
    /// Masks: soft edge this many pixels wide (0 to the image's longer side).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub feather_px: f32,
    /// Folder for image.png, labels.png, segments.png, segments.json and mask_<id>_<label>.png
    /// (created when the files are written).
    #[arg(long)]
    pub out_dir: PathBuf,
    /// Print nothing but errors.
    #[arg(long, short)]
    pub quiet: bool,
}

/// A generated image with its attention, ready to segment.
pub(super) struct Generated {
    /// The image and its prompt's tokens.
    pub(super) output: GenerateOutput,
    /// The attention the run stored.
    pub(super) store: AttentionStore,
    /// The request that made it.
    pub(super) request: GenerateRequest,
}

/// Generates `prompt` with an attention store that keeps self-attention.
pub(super) fn generate_with_attention(
    model: &StableDiffusion,
    prompt: &str,
    seed: u64,
    steps: usize,
    guidance: Option<f64>,
) -> anyhow::Result<Generated> {
    generate_request_with_attention(model, segment_request(model, prompt, seed, steps, guidance))
}

/// The request `attend segment` generates: `prompt` with `seed`, `steps` and `guidance` (the
/// generate default when `None`).
fn segment_request(
    model: &StableDiffusion,
    prompt: &str,
    seed: u64,
    steps: usize,
    guidance: Option<f64>,
) -> GenerateRequest {
    let mut request = GenerateRequest::new(model, prompt.to_string());
    request.seed = seed;
    request.steps = steps;
    if let Some(guidance) = guidance {
        request.guidance = guidance;
    }
    request
}

/// Runs `request` with an attention store that keeps self-attention.
pub(super) fn generate_request_with_attention(
    model: &StableDiffusion,
    request: GenerateRequest,
) -> anyhow::Result<Generated> {
    let token_count = model
        .tokenizer
        .encode_prompt(&request.prompt)?
        .token_count();
    let mut store = AttentionStore::new(StoreConfig::new(token_count));
    let output = generate(
        model,
        &request,
        Some(&mut store),
        &mut |_| Ok(()),
        &CancelToken::new(),
    )?;
    store.finish_step()?;
    Ok(Generated {
        output,
        store,
        request,
    })
}

/// The self-attention maps the method uses: for KMeans the up and down blocks (local-prompt-mixing),
/// for DiffSeg every block; one map per stored resolution, over the chosen steps.
fn self_attention_maps(
    store: &AttentionStore,
    method: SegmentMethod,
    span: SelfAttentionSpan,
) -> Vec<SelfAttentionMap> {
    let places: &[UnetPlace] = match method {
        SegmentMethod::KMeans => &[UnetPlace::Down, UnetPlace::Up],
        SegmentMethod::DiffSeg => &[UnetPlace::Down, UnetPlace::Mid, UnetPlace::Up],
    };
    store
        .self_attention_resolutions()
        .into_iter()
        .filter_map(|(h, w)| store.self_attention(h, w, places, span))
        .collect()
}

/// The prompt words that compete for labels: the ones named in `--words` (each must be in the
/// prompt), or by default those [`is_label_candidate`] keeps.
pub(super) fn label_words(
    prompt_words: &[WordSpan],
    chosen: Option<&[String]>,
) -> anyhow::Result<Vec<WordSpan>> {
    let Some(chosen) = chosen else {
        return Ok(prompt_words
            .iter()
            .filter(|word| is_label_candidate(&word.text))
            .cloned()
            .collect());
    };
    let mut words = Vec::new();
    for wanted in chosen {
        let wanted = wanted.trim().to_lowercase();
        if wanted.is_empty() {
            continue;
        }
        let matching: Vec<&WordSpan> = prompt_words
            .iter()
            .filter(|word| word.text.to_lowercase() == wanted)
            .collect();
        anyhow::ensure!(
            !matching.is_empty(),
            "--words: {wanted:?} is not a word of the prompt (its words: {})",
            prompt_words
                .iter()
                .map(|word| word.text.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        words.extend(matching.into_iter().cloned());
    }
    Ok(words)
}

/// Segments and labels a generated image (DAAM word heat maps at image size over every step).
pub(super) fn segment_generated(
    generated: &Generated,
    words: &[WordSpan],
    arguments: &SegmentationArgs,
) -> anyhow::Result<(LabelledSegmentation, Vec<Heatmap>)> {
    let image = &generated.output.image;
    let heatmaps = word_heatmaps(
        generated.store.steps(),
        words,
        &AggregationSettings::default(),
        image.height,
        image.width,
    );
    let maps = self_attention_maps(&generated.store, arguments.method, arguments.span());
    let word_maps: Vec<WordMapRef<'_>> = heatmaps.iter().map(WordMapRef::from).collect();
    let result = segment_and_label(
        &maps,
        &word_maps,
        &arguments.settings(),
        image.height,
        image.width,
    )
    .context("segmentation failed")?;
    Ok((result, heatmaps))
}

/// `[h, w, 3]`: the image with every segment's colour blended over it (half and half).
pub(super) fn overlay_segments(image_rgb: &[u8], result: &LabelledSegmentation) -> Vec<u8> {
    image_rgb
        .iter()
        .zip(result.image.colourised())
        .map(|(&pixel, colour)| ((u16::from(pixel) + u16::from(colour)) / 2) as u8)
        .collect()
}

/// `cat 0.65, sunglasses 0.19`: the scores, best first.
fn scores_text(segment: &attend::analysis::segment::SegmentInfo) -> String {
    let mut scores: Vec<_> = segment.scores.iter().collect();
    scores.sort_by(|a, b| b.score.total_cmp(&a.score));
    scores
        .iter()
        .map(|score| format!("{} {:.2}", score.word, score.score))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The largest self-attention grid `(h, w)` an [`AttentionStore`] with default settings keeps for
/// a `width x height` image: the query grids of the UNet's attention blocks (the latent size halved
/// at each down-sampling) no longer than [`StoreConfig::self_max_side`] per side. `None` when no
/// grid is kept. Known before any generation, from the model's config alone.
pub(super) fn largest_kept_self_attention_grid(
    model: &StableDiffusion,
    width: usize,
    height: usize,
) -> Option<(usize, usize)> {
    let factor = model.latent_downscale_factor().max(1);
    let (mut h, mut w) = (height / factor, width / factor);
    let config = model.unet.config();
    let mut grids = Vec::new();
    for block in config.down_blocks() {
        if block.kind == DownBlockKind::CrossAttn {
            grids.push((h, w));
        }
        if block.downsample {
            (h, w) = (h.div_ceil(2), w.div_ceil(2));
        }
    }
    if config.mid_block().is_some() {
        grids.push((h, w));
    }
    let max_side = StoreConfig::default().self_max_side;
    grids
        .into_iter()
        .filter(|&(h, w)| h > 0 && w > 0 && h.max(w) <= max_side)
        .max_by_key(|&(h, w)| h * w)
}

/// `--guidance`, when given, must be a finite number.
pub(super) fn check_guidance(guidance: Option<f64>) -> anyhow::Result<()> {
    if let Some(guidance) = guidance {
        anyhow::ensure!(
            guidance.is_finite(),
            "invalid --guidance: {guidance} is not a finite number"
        );
    }
    Ok(())
}

/// Each label word's position among the prompt's words (a word is known by its tokens).
fn prompt_positions(prompt_words: &[WordSpan], words: &[WordSpan]) -> Vec<usize> {
    words
        .iter()
        .filter_map(|word| {
            prompt_words
                .iter()
                .position(|prompt_word| prompt_word.token_indices == word.token_indices)
        })
        .collect()
}

/// Run `attend segment`. Every flag is checked before the model generates: first the ranges, then
/// (with the model loaded) the words and what the image size allows. The output folder is made
/// when the files are written.
pub fn run(args: &SegmentArgs) -> anyhow::Result<()> {
    args.segmentation.check()?;
    check_guidance(args.guidance)?;
    let image_input = args.image.read(&args.prompt)?;
    let mut out_dir = OutDir::check("--out-dir", &args.out_dir)?;
    out_dir.check_files(&["image.png", "labels.png", "segments.png", "segments.json"])?;
    let model = load_model(&args.model)?;
    warn_unknown_words(&model, "--prompt", &args.prompt)?;
    let (width, height) = model.default_size_px();
    args.segmentation.check_for_model(&model, width, height)?;
    let mask_settings = MaskSettings {
        dilate_px: args.dilate_px,
        feather_px: args.feather_px,
        ..MaskSettings::default()
    };
    mask_settings
        .validate(height, width)
        .map_err(segmentation_flag_error)?;
    let prompt_words = model.tokenizer.encode_prompt(&args.prompt)?.words;
    let words = label_words(&prompt_words, args.segmentation.words.as_deref())?;
    if words.is_empty() {
        eprintln!("warning: no prompt word competes for labels; every segment is background");
    }

    let mut request = segment_request(&model, &args.prompt, args.seed, args.steps, args.guidance);
    if let Some(input) = &image_input {
        replay_given_image(&model, input, &mut request, args.quiet)?;
    }
    let started = Instant::now();
    let generated = generate_request_with_attention(&model, request)?;
    for warning in &generated.output.warnings {
        eprintln!("warning: {warning}");
    }
    let generation_secs = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let (mut result, _) = segment_generated(&generated, &words, &args.segmentation)?;
    set_prompt_word_indices(
        &mut result.segments,
        &prompt_positions(&generated.output.prompt_tokens.words, &words),
    );
    let segment_secs = started.elapsed().as_secs_f64();

    let image = &generated.output.image;
    let parameters = a1111_parameters(&super::generate::generation_parameters(
        &model,
        &generated.request,
        &generated.output,
    ));
    let out = out_dir.create()?;
    write_png_rgb(
        &out.join("image.png"),
        image.width,
        image.height,
        &image.pixels,
        Some(&parameters),
    )?;
    write_label_map_png(&out.join("labels.png"), &result.image)?;
    write_png_rgb(
        &out.join("segments.png"),
        image.width,
        image.height,
        &overlay_segments(&image.pixels, &result),
        None,
    )?;
    write_segments_json(
        &out.join("segments.json"),
        &SegmentsFile {
            prompt: Some(args.prompt.clone()),
            method: result.method,
            width: image.width,
            height: image.height,
            segments: result.segments.clone(),
        },
    )?;
    for segment in &result.segments {
        let mask = result.mask(&[segment.id], &mask_settings);
        write_mask_png(&out.join(mask_file_name(segment.id, &segment.label)), &mask)?;
    }
    if !args.quiet {
        eprintln!(
            "generated in {generation_secs:.1} s, segmented ({}, {} segments on {}x{}) in {:.0} ms",
            result.method,
            result.segments.len(),
            result.grid.w,
            result.grid.h,
            segment_secs * 1e3
        );
        for segment in &result.segments {
            println!(
                "segment {} ({} px): {} [{}]",
                segment.id,
                segment.pixel_count,
                segment.label,
                scores_text(segment)
            );
        }
        eprintln!("wrote {}", out.display());
    }
    out_dir.keep();
    Ok(())
}

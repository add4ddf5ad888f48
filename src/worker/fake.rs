//! A fake [`Engine`] that synthesises a preview image and attention maps without any model.
//!
//! Each prompt word gets a coloured blob at a place fixed by the seed and the word; its
//! cross-attention is a Gaussian around that place that sharpens over the steps, and the image
//! denoises towards the blobs. Deterministic: the same parameters give the same bytes.
//! It serves the worker-protocol and UI tests, and UI work while the real engine is busy elsewhere.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::analysis::export::write_attention_safetensors;
use crate::analysis::heatmap::UnetPlace;
use crate::analysis::segment::{is_label_candidate, LabelledSegmentation};
use crate::analysis::WordSpan;
use crate::hook::CancelToken;
use crate::kernels::ProductPrecision;
use crate::worker::backend::{EditRunOutput, Engine, RunObserver, RunOutput};
use crate::worker::engine::product_precision_for;
use crate::worker::error::EngineError;
use crate::worker::plain::{
    CrossGroup, Heatmap, RgbImage, SelfAttentionMap, SelfAttentionSpan, StepCross,
};
use crate::worker::protocol::{
    Branch, EditSpec, GenerateParams, ModelInfo, ModelLoadProgress, ModelSource, Products,
    PromptInfo, SelfReplace, StepFrame, StepTiming, StepWindow,
};
use crate::worker::segment::{requested_grids, segment_run, SegmentRequest};

/// Knobs of the fake engine.
#[derive(Clone, Debug, Default)]
pub struct FakeEngineConfig {
    /// Time each step takes (sleep), to show progress in the editor.
    pub step_delay: Duration,
    /// Time loading a model takes.
    pub load_delay: Duration,
    /// If the prompt contains this word, the engine panics during step 1 (for panic-recovery tests).
    pub panic_word: Option<String>,
    /// When set, every step of every branch waits for a permit from this gate before it starts, so
    /// a test can hold a run at a step boundary and know exactly how many steps ran.
    pub step_gate: Option<StepGate>,
}

/// Permits for the fake engine's steps (see [`FakeEngineConfig::step_gate`]). Clones share the
/// permits.
#[derive(Clone, Debug, Default)]
pub struct StepGate {
    /// Permits not taken yet, and the signal that more were given.
    permits: Arc<(Mutex<usize>, Condvar)>,
}

/// How often a step waiting at the gate looks at its cancel token.
const GATE_CANCEL_POLL: Duration = Duration::from_millis(5);

impl StepGate {
    /// A gate with no permits: the next step waits.
    pub fn new() -> Self {
        Self::default()
    }

    /// Lets `steps` more steps start.
    pub fn allow(&self, steps: usize) {
        let (permits, given) = &*self.permits;
        *Self::lock(permits) += steps;
        given.notify_all();
    }

    /// Waits for a permit and takes it; returns `false` without taking one once `cancel` is
    /// tripped (a cancelled run leaves its permits to the next run).
    fn take(&self, cancel: &CancelToken) -> bool {
        let (permits, given) = &*self.permits;
        let mut available = Self::lock(permits);
        loop {
            if cancel.is_cancelled() {
                return false;
            }
            if *available > 0 {
                *available -= 1;
                return true;
            }
            available = match given.wait_timeout(available, GATE_CANCEL_POLL) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    fn lock(permits: &Mutex<usize>) -> MutexGuard<'_, usize> {
        // A count cannot be left half-written by a panic.
        match permits.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// The schedulers the fake pretends to have (the real engine's names).
const FAKE_SCHEDULERS: [&str; 4] = ["ddim", "euler", "euler-a", "dpmpp-2m"];
/// Sizes must be multiples of this (three halvings, like a small UNet).
const FAKE_SIZE_MULTIPLE_PX: usize = 16;
/// Prompt words beyond this are dropped with a warning (77 tokens minus start and end).
const FAKE_MAX_WORDS: usize = 75;

/// What the fake remembers of its latest run.
#[derive(Clone, Debug, Default)]
struct FakeRun {
    /// Blob centres `(y, x)` in `[0, 1]` per word.
    centres: Vec<(f32, f32)>,
    /// Blob width at the last step (fraction of the image).
    sigma: f32,
    /// Self-attention grids kept.
    self_grids: Vec<(usize, usize)>,
    /// Every step's cross-attention, shared with the steps' frames.
    steps: Vec<Arc<StepCross>>,
    /// Tokens of the prompt.
    tokens: Vec<String>,
    /// Words of the prompt.
    words: Vec<WordSpan>,
    /// Image size `(height, width)` in pixels (Segments view).
    image_size: (usize, usize),
    /// The real image's reconstruction a replaying run denoises towards (instead of the blobs).
    background: Option<RgbImage>,
}

mod edit;
// Real images.
mod image;
// Style sets.
mod style_set;
pub use style_set::FAKE_SET_MAX_PIXELS;
// Appearance transfer.
mod appearance;

/// The fake engine. See the module docs.
pub struct FakeEngine {
    config: FakeEngineConfig,
    model: Option<ModelInfo>,
    latest_run: Option<FakeRun>,
    /// The recorded source of edits.
    edit_source: Option<edit::FakeEditSource>,
    /// How many sources were recorded so far.
    source_recordings: u64,
    // Real images.
    /// The latest inversions.
    inversions: crate::worker::backend::InversionCache<image::FakeInversion>,
    /// How many images were inverted so far (a cached inversion does not count).
    inversions_computed: u64,
    // Style sets.
    /// Every image's run of the latest style set.
    style_set: Option<style_set::FakeStyleSet>,
}

impl FakeEngine {
    /// A fake engine with no model loaded.
    pub fn new(config: FakeEngineConfig) -> Self {
        Self {
            config,
            model: None,
            latest_run: None,
            edit_source: None,
            source_recordings: 0,
            inversions: Default::default(),
            inversions_computed: 0,
            style_set: None,
        }
    }

    /// How many times this engine recorded an edit's source (edit mode).
    pub fn source_recordings(&self) -> u64 {
        self.source_recordings
    }

    /// Waits at the step gate, if there is one, then checks `cancel`: the start of every step.
    fn begin_step(&self, cancel: &CancelToken) -> Result<(), EngineError> {
        let permitted = self
            .config
            .step_gate
            .as_ref()
            .is_none_or(|gate| gate.take(cancel));
        if !permitted || cancel.is_cancelled() {
            return Err(EngineError::Cancelled);
        }
        std::thread::sleep(self.config.step_delay);
        Ok(())
    }
}

impl Engine for FakeEngine {
    fn load_model_observed(
        &mut self,
        source: &ModelSource,
        products: Products,
        _progress: &mut dyn FnMut(ModelLoadProgress) -> Result<(), EngineError>,
    ) -> Result<ModelInfo, EngineError> {
        std::thread::sleep(self.config.load_delay);
        let name = match source {
            ModelSource::Bundled => "fake shapes (synthetic)".to_owned(),
            ModelSource::Folder(path) => {
                let index = path.join("model_index.json");
                if !index.is_file() {
                    return Err(crate::pipeline::PipelineError::Missing {
                        what: "model_index.json",
                        path: index,
                    }
                    .into());
                }
                path.file_name()
                    .map(|name| name.to_string_lossy().into_owned())
                    .unwrap_or_else(|| path.display().to_string())
            }
            ModelSource::File(path) => {
                if !path.is_file() {
                    return Err(crate::pipeline::PipelineError::Missing {
                        what: "checkpoint file",
                        path: path.clone(),
                    }
                    .into());
                }
                path.file_stem()
                    .map(|name| name.to_string_lossy().into_owned())
                    .unwrap_or_else(|| path.display().to_string())
            }
        };
        let info = ModelInfo {
            source: source.clone(),
            name,
            default_width_px: 64,
            default_height_px: 64,
            size_multiple_px: FAKE_SIZE_MULTIPLE_PX,
            default_scheduler: FAKE_SCHEDULERS[0].to_owned(),
            schedulers: FAKE_SCHEDULERS
                .iter()
                .map(|name| (*name).to_owned())
                .collect(),
            warnings: Vec::new(),
            // Like the real bundled model, the fake one recommends its own self-attention window.
            edit_self_replace: match source {
                ModelSource::Bundled => SelfReplace {
                    window: StepWindow::until(0.2),
                    max_queries: 32 * 32,
                },
                ModelSource::Folder(_) | ModelSource::File(_) => SelfReplace::default(),
            },
            // Synthetic maps have no products: the fake offers both precisions on every CPU.
            bf16_products: product_precision_for(source, products) == ProductPrecision::Bf16,
            bf16_products_available: true,
        };
        self.model = Some(info.clone());
        self.latest_run = None;
        self.edit_source = None;
        self.inversions.clear();
        self.style_set = None;
        Ok(info)
    }

    fn generate(
        &mut self,
        params: &GenerateParams,
        observer: &mut dyn RunObserver,
        cancel: &CancelToken,
    ) -> Result<RunOutput, EngineError> {
        let Some(model) = &self.model else {
            return Err(EngineError::NoModel);
        };
        let started_at = Instant::now();
        let resolved = self.resolve_run(params, model)?;
        let background = self.replayed_image(params);
        let width = resolved.width_px.unwrap_or(model.default_width_px);
        let height = resolved.height_px.unwrap_or(model.default_height_px);
        let prompt = tokenize(&resolved.prompt);
        let centres: Vec<(f32, f32)> = prompt
            .words
            .iter()
            .enumerate()
            .map(|(index, word)| blob_centre(resolved.seed, &word.text, index))
            .collect();
        let mut run = FakeRun {
            centres,
            sigma: 0.5,
            self_grids: vec![(height / 8, width / 8), (height / 4, width / 4)],
            steps: Vec::with_capacity(resolved.steps),
            tokens: prompt.tokens.clone(),
            words: prompt.words.clone(),
            image_size: (height, width),
            background,
        };
        observer.started(Branch::Source, &resolved, prompt, None)?;
        let denoised = self.denoise(&resolved, &mut run, observer, cancel, started_at);
        let self_attention_grids = run.self_grids.clone();
        // What ran is kept, so a cancelled run can still be probed.
        self.latest_run = (!run.steps.is_empty()).then_some(run);
        Ok(RunOutput {
            image: denoised?,
            self_attention_grids,
        })
    }

    fn self_attention(
        &self,
        grid_h: usize,
        grid_w: usize,
        _span: SelfAttentionSpan,
    ) -> Result<Option<SelfAttentionMap>, EngineError> {
        let Some(run) = &self.latest_run else {
            return Ok(None);
        };
        if !run.self_grids.contains(&(grid_h, grid_w)) {
            return Ok(None);
        }
        Ok(Some(self_attention_map(run, grid_h, grid_w)))
    }

    fn write_attention(&self, path: &Path, word_heatmaps: &[Heatmap]) -> Result<(), EngineError> {
        let Some(run) = &self.latest_run else {
            return Err(EngineError::Unavailable("no run to export".to_owned()));
        };
        let cross = cross_by_resolution(&run.steps);
        write_attention_safetensors(path, &cross, word_heatmaps, &run.words, &run.tokens)?;
        Ok(())
    }

    fn generate_edit(
        &mut self,
        params: &GenerateParams,
        spec: Option<&EditSpec>,
        observer: &mut dyn RunObserver,
        cancel: &CancelToken,
    ) -> Result<EditRunOutput, EngineError> {
        self.run_edit(params, spec, observer, cancel)
    }

    // Segments view: the synthetic self-attention is block-structured (one block per object word),
    // so the clustering finds the objects.
    fn segment(&self, request: &SegmentRequest) -> Result<LabelledSegmentation, EngineError> {
        let Some(run) = &self.latest_run else {
            return Err(EngineError::Unavailable("no run to segment".to_owned()));
        };
        let maps: Vec<SelfAttentionMap> = requested_grids(request, &run.self_grids)?
            .into_iter()
            .map(|(h, w)| self_attention_map(run, h, w))
            .collect();
        let steps: Vec<StepCross> = run
            .steps
            .iter()
            .map(|step| StepCross::clone(step))
            .collect();
        let (image_h, image_w) = run.image_size;
        segment_run(&maps, &steps, &run.words, image_h, image_w, request)
    }

    // Real images.
    fn invert(
        &mut self,
        image: &RgbImage,
        params: &crate::worker::protocol::InversionParams,
        observer: &mut dyn RunObserver,
        cancel: &CancelToken,
    ) -> Result<crate::worker::backend::InversionOutput, EngineError> {
        self.invert_image(image, params, observer, cancel)
    }

    // Style sets.
    fn generate_style_set(
        &mut self,
        params: &crate::worker::StyleSetParams,
        observer: &mut dyn RunObserver,
        cancel: &CancelToken,
    ) -> Result<crate::worker::StyleSetOutput, EngineError> {
        self.run_style_set(params, observer, cancel)
    }

    fn select_style_image(&mut self, index: usize) -> Result<(), EngineError> {
        self.select_image_of_set(index)
    }

    // Appearance transfer.
    fn appearance_transfer(
        &mut self,
        params: &crate::worker::appearance::AppearanceTransferParams,
        observer: &mut dyn RunObserver,
        cancel: &CancelToken,
    ) -> Result<crate::worker::appearance::AppearanceResult, EngineError> {
        self.transfer_appearance(params, observer, cancel)
    }
}

impl FakeEngine {
    /// The steps of a plain run (or an edit's source): each step's maps go into `run` and to the
    /// observer; returns the final image.
    fn denoise(
        &self,
        resolved: &GenerateParams,
        run: &mut FakeRun,
        observer: &mut dyn RunObserver,
        cancel: &CancelToken,
        started_at: Instant,
    ) -> Result<RgbImage, EngineError> {
        let (height, width) = run.image_size;
        let token_count = run.tokens.len();
        let grids = fake_grids(height, width);
        let mut preview = RgbImage::black(width, height);
        for step_index in 0..resolved.steps {
            let step_started = Instant::now();
            self.begin_step(cancel)?;
            if step_index == 1 {
                if let Some(word) = &self.config.panic_word {
                    if resolved.prompt.split_whitespace().any(|w| w == word) {
                        std::panic::panic_any(format!(
                            "fake engine: prompt contains the panic word {word:?}"
                        ));
                    }
                }
            }
            let progress = (step_index + 1) as f32 / resolved.steps as f32;
            run.sigma = 0.45 - 0.3 * progress;
            let groups = grids
                .iter()
                .map(|&(place, grid_h, grid_w, layer_count)| CrossGroup {
                    place,
                    h: grid_h,
                    w: grid_w,
                    layer_count,
                    token_count,
                    data: cross_maps(&run.centres, run.sigma, token_count, grid_h, grid_w),
                })
                .collect();
            let cross = Arc::new(StepCross { step_index, groups });
            run.steps.push(Arc::clone(&cross));
            preview = match &run.background {
                Some(background) => image::fade_in(background, progress, resolved.seed),
                None => synthesise_image(
                    &run.centres,
                    run.sigma,
                    progress,
                    resolved.seed,
                    width,
                    height,
                ),
            };
            let frame = StepFrame {
                step_index,
                step_count: resolved.steps,
                timestep: 1000.0 * (1.0 - step_index as f64 / resolved.steps as f64),
                preview: preview.clone(),
                cross,
                timing: StepTiming {
                    step_secs: step_started.elapsed().as_secs_f64(),
                    elapsed_secs: started_at.elapsed().as_secs_f64(),
                },
            };
            observer.step(Branch::Source, frame, None)?;
            if let Some(query) = observer.take_self_attention_query() {
                let map = run
                    .self_grids
                    .contains(&(query.grid_h, query.grid_w))
                    .then(|| self_attention_map(run, query.grid_h, query.grid_w));
                observer.self_attention(query, map)?;
            }
        }
        Ok(preview)
    }
}

/// The fake UNet's attention places and grids: `(place, h, w, layers)` for an image of
/// `height x width` pixels.
fn fake_grids(height: usize, width: usize) -> [(UnetPlace, usize, usize, usize); 5] {
    [
        (UnetPlace::Down, height / 4, width / 4, 2),
        (UnetPlace::Down, height / 8, width / 8, 2),
        (UnetPlace::Mid, height / 16, width / 16, 1),
        (UnetPlace::Up, height / 8, width / 8, 3),
        (UnetPlace::Up, height / 4, width / 4, 3),
    ]
}

/// Checks and fills in defaults the way the real engine does.
fn resolve_params(
    params: &GenerateParams,
    model: &ModelInfo,
) -> Result<GenerateParams, EngineError> {
    if params.steps == 0 || params.steps > 1000 {
        return Err(EngineError::InvalidArgument {
            name: "steps",
            reason: format!("{} is not in 1..=1000", params.steps),
        });
    }
    let mut resolved = params.clone();
    for (name, value, default) in [
        ("width", &mut resolved.width_px, model.default_width_px),
        ("height", &mut resolved.height_px, model.default_height_px),
    ] {
        let size = value.unwrap_or(default);
        if size == 0 || size % FAKE_SIZE_MULTIPLE_PX != 0 || size > 4096 {
            return Err(EngineError::InvalidArgument {
                name,
                reason: format!("{size} px is not a positive multiple of {FAKE_SIZE_MULTIPLE_PX} (at most 4096)"),
            });
        }
        *value = Some(size);
    }
    let scheduler = resolved
        .scheduler
        .clone()
        .unwrap_or_else(|| model.default_scheduler.clone());
    if !model.schedulers.contains(&scheduler) {
        return Err(EngineError::InvalidArgument {
            name: "scheduler",
            reason: format!(
                "{scheduler:?} is not one of {}",
                model.schedulers.join(", ")
            ),
        });
    }
    resolved.scheduler = Some(scheduler);
    Ok(resolved)
}

/// Whitespace words, punctuation stripped, lower-cased; tokens `<start>`, words, `<end>`.
fn tokenize(prompt: &str) -> PromptInfo {
    let mut words = Vec::new();
    let mut tokens = vec!["<start>".to_owned()];
    let mut warnings = Vec::new();
    let mut dropped = Vec::new();
    for text in crate::analysis::plain_words(prompt) {
        if words.len() == FAKE_MAX_WORDS {
            dropped.push(text);
            continue;
        }
        tokens.push(text.clone());
        words.push(WordSpan {
            text,
            token_indices: vec![tokens.len() - 1],
        });
    }
    tokens.push("<end>".to_owned());
    if !dropped.is_empty() {
        warnings.push(format!(
            "prompt truncated to {} tokens; dropped: {}",
            FAKE_MAX_WORDS + 2,
            dropped.join(" ")
        ));
    }
    PromptInfo {
        words,
        tokens,
        warnings,
    }
}

/// A 64-bit mix (splitmix64), for deterministic pseudo-random numbers.
fn mix(mut value: u64) -> u64 {
    value = value.wrapping_add(0x9E37_79B9_7F4A_7C15);
    value = (value ^ (value >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    value = (value ^ (value >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    value ^ (value >> 31)
}

/// A number in `[0, 1)` from a hash.
fn unit(hash: u64) -> f32 {
    (hash >> 40) as f32 / (1u64 << 24) as f32
}

fn text_hash(text: &str) -> u64 {
    text.bytes().fold(0xCBF2_9CE4_8422_2325, |hash, byte| {
        mix(hash ^ u64::from(byte))
    })
}

/// Where a word's blob sits, `(y, x)` in `[0.2, 0.8]`.
fn blob_centre(seed: u64, word: &str, index: usize) -> (f32, f32) {
    let hash = mix(seed ^ text_hash(word) ^ mix(index as u64));
    (0.2 + 0.6 * unit(hash), 0.2 + 0.6 * unit(mix(hash)))
}

/// The colour of word `index`'s blob.
fn blob_colour(index: usize) -> [f32; 3] {
    const PALETTE: [[f32; 3]; 6] = [
        [230.0, 80.0, 60.0],
        [60.0, 160.0, 230.0],
        [250.0, 200.0, 50.0],
        [90.0, 200.0, 110.0],
        [180.0, 90.0, 220.0],
        [240.0, 140.0, 40.0],
    ];
    PALETTE[index % PALETTE.len()]
}

fn gaussian(y: f32, x: f32, centre: (f32, f32), sigma: f32) -> f32 {
    let (dy, dx) = (y - centre.0, x - centre.1);
    (-(dy * dy + dx * dx) / (2.0 * sigma * sigma)).exp()
}

/// `[tokens, grid_h, grid_w]`: per pixel a distribution over tokens (start token takes most mass
/// where no word's blob is).
fn cross_maps(
    centres: &[(f32, f32)],
    sigma: f32,
    token_count: usize,
    grid_h: usize,
    grid_w: usize,
) -> Vec<f32> {
    let plane = grid_h * grid_w;
    let mut data = vec![0.0; token_count * plane];
    let mut scores = vec![0.0f32; token_count];
    for y in 0..grid_h {
        for x in 0..grid_w {
            let (fy, fx) = (
                (y as f32 + 0.5) / grid_h as f32,
                (x as f32 + 0.5) / grid_w as f32,
            );
            scores[0] = 1.0;
            for (word_index, centre) in centres.iter().enumerate() {
                scores[word_index + 1] = 4.0 * gaussian(fy, fx, *centre, sigma);
            }
            scores[token_count - 1] = 0.1;
            let total: f32 = scores.iter().sum();
            for (token, score) in scores.iter().enumerate() {
                data[token * plane + y * grid_w + x] = score / total;
            }
        }
    }
    data
}

/// The preview at `progress` (0..1]: noise fading into blobs on a grey background.
fn synthesise_image(
    centres: &[(f32, f32)],
    sigma: f32,
    progress: f32,
    seed: u64,
    width: usize,
    height: usize,
) -> RgbImage {
    let blobs: Vec<edit::Blob> = centres
        .iter()
        .enumerate()
        .map(|(index, &centre)| edit::Blob {
            centre,
            colour: blob_colour(index),
            strength: 1.0,
        })
        .collect();
    edit::synthesise_blobs(&blobs, sigma, progress, seed, width, height)
}

/// Share of a self-attention row that goes to the query's own object (or the background).
const FAKE_BLOCK_SHARE: f32 = 0.75;
/// Share spread evenly over every cell (real attention is never exactly zero anywhere); the rest
/// is local attention around the query.
const FAKE_UNIFORM_SHARE: f32 = 0.05;

/// `[q, q]`, block-structured: each query spends [`FAKE_BLOCK_SHARE`] of its attention evenly on
/// the cells of the object it lies on (or of the background), [`FAKE_UNIFORM_SHARE`] evenly on all
/// cells and the rest around itself, so every
/// row peaks at its own cell and clustering the rows finds the objects. Objects are the blobs of
/// the words that can name things ([`is_label_candidate`]; every word's when none can).
fn self_attention_map(run: &FakeRun, grid_h: usize, grid_w: usize) -> SelfAttentionMap {
    let queries = grid_h * grid_w;
    let mut data = vec![0.0; queries * queries];
    let position = |index: usize| {
        (
            ((index / grid_w) as f32 + 0.5) / grid_h as f32,
            ((index % grid_w) as f32 + 0.5) / grid_w as f32,
        )
    };
    let mut objects: Vec<(f32, f32)> = run
        .words
        .iter()
        .zip(&run.centres)
        .filter(|(word, _)| is_label_candidate(&word.text))
        .map(|(_, centre)| *centre)
        .collect();
    if objects.is_empty() {
        objects = run.centres.clone();
    }
    // The object each cell lies on (`objects.len()`: the background), by the drawn blob's width.
    let owners: Vec<usize> = (0..queries)
        .map(|cell| {
            let (y, x) = position(cell);
            objects
                .iter()
                .map(|centre| gaussian(y, x, *centre, run.sigma * 0.6))
                .enumerate()
                .filter(|(_, weight)| *weight > 0.3)
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map_or(objects.len(), |(index, _)| index)
        })
        .collect();
    let mut block_sizes = vec![0usize; objects.len() + 1];
    owners.iter().for_each(|&owner| block_sizes[owner] += 1);
    for query in 0..queries {
        let query_position = position(query);
        let owner = owners[query];
        let row = &mut data[query * queries..(query + 1) * queries];
        for (key, value) in row.iter_mut().enumerate() {
            let (ky, kx) = position(key);
            *value = gaussian(ky, kx, query_position, 0.08);
        }
        let local_total: f32 = row.iter().sum();
        let block_value = FAKE_BLOCK_SHARE / block_sizes[owner].max(1) as f32;
        let uniform_value = FAKE_UNIFORM_SHARE / queries as f32;
        let local_share = 1.0 - FAKE_BLOCK_SHARE - FAKE_UNIFORM_SHARE;
        for (value, &key_owner) in row.iter_mut().zip(&owners) {
            *value = *value * local_share / local_total.max(f32::MIN_POSITIVE) + uniform_value;
            if key_owner == owner {
                *value += block_value;
            }
        }
    }
    SelfAttentionMap {
        h: grid_h,
        w: grid_w,
        layer_count: 1,
        step_count: 1,
        data,
    }
}

/// `(h, w) -> [steps, tokens, h, w]`: places averaged weighted by layer count, as the store's
/// `cross_by_resolution` does.
fn cross_by_resolution(steps: &[Arc<StepCross>]) -> BTreeMap<(usize, usize), Vec<f32>> {
    let mut out: BTreeMap<(usize, usize), Vec<f32>> = BTreeMap::new();
    for step in steps {
        let mut per_grid: BTreeMap<(usize, usize), (Vec<f32>, usize)> = BTreeMap::new();
        for group in &step.groups {
            let (sum, layers) = per_grid
                .entry((group.h, group.w))
                .or_insert_with(|| (vec![0.0; group.data.len()], 0));
            sum.iter_mut()
                .zip(&group.data)
                .for_each(|(total, value)| *total += value * group.layer_count as f32);
            *layers += group.layer_count;
        }
        for (grid, (sum, layers)) in per_grid {
            let scale = 1.0 / layers.max(1) as f32;
            out.entry(grid)
                .or_default()
                .extend(sum.iter().map(|value| value * scale));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenize_keeps_words_and_positions() {
        let prompt = tokenize("An orange square, and a  BLUE circle!");
        let texts: Vec<&str> = prompt.words.iter().map(|w| w.text.as_str()).collect();
        assert_eq!(
            texts,
            ["an", "orange", "square", "and", "a", "blue", "circle"]
        );
        assert_eq!(prompt.words[2].token_indices, [3]);
        assert_eq!(prompt.tokens.len(), 9);
    }

    #[test]
    fn cross_maps_are_distributions_over_tokens() {
        let maps = cross_maps(&[(0.25, 0.25), (0.75, 0.75)], 0.2, 4, 8, 8);
        for pixel in 0..64 {
            let total: f32 = (0..4).map(|token| maps[token * 64 + pixel]).sum();
            assert!((total - 1.0).abs() < 1e-5);
        }
        // Word 0's map peaks in the top-left quarter.
        let word0 = &maps[64..128];
        let peak = word0
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(index, _)| index)
            .unwrap();
        assert!(peak / 8 < 4 && peak % 8 < 4);
    }
}

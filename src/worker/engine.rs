//! [`PipelineEngine`]: the real [`Engine`], over the candle pipeline
//! ([`crate::pipeline::model::StableDiffusion`], [`crate::pipeline::sampling::generate`]) with an
//! [`AttentionStore`] recording every step's attention.
//!
//! The engine drives the sampling loop itself, one [`Sampler`] step at a time: the store is handed to
//! the UNet's attention hook during a step and read between steps (each step's maps go out as a
//! frame), so it needs no sharing. The run's prompt is prepared once ([`prepare_run`]) and reported
//! before the first step; an observer's error stops the run as itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::analysis::export::write_attention_safetensors;
use crate::analysis::heatmap::{
    Heatmap, SelfAttentionMap, SelfAttentionSpan, StepCross, UnetPlace,
};
use crate::analysis::WordSpan;
use crate::attention::prompt_weights::{PromptWeights, WeightedRun};
use crate::attention::store::{AttentionStore, StoreConfig};
use crate::hook::CancelToken;
use crate::kernels::ProductPrecision;
use crate::pipeline::model::{LoadOptions, StableDiffusion};
use crate::pipeline::sampling::{PreparedRun, Sampler, StepReport, StepwiseRun};
use crate::pipeline::scheduler::SchedulerKind;
use crate::pipeline::PipelineError;
use crate::worker::backend::{Engine, RunObserver, RunOutput};
use crate::worker::error::EngineError;
use crate::worker::plain::RgbImage;
use crate::worker::protocol::{
    Branch, GenerateParams, ModelInfo, ModelLoadProgress, ModelSource, Products, PromptInfo,
    SelfReplace, StepFrame, StepTiming,
};
use crate::worker::thread::EngineFactory;
// Segments view.
use crate::analysis::segment::LabelledSegmentation;
use crate::worker::segment::{requested_grids, segment_run, self_attention_places, SegmentRequest};

/// Folder of the bundled model inside the source tree and next to installed binaries.
pub const BUNDLED_MODEL_FOLDER: &str = "assets/attend-shapes";

/// How the bundled model's UNet multiplies: bf16 operands with f32 sums (on CPUs with AVX-512
/// BF16; elsewhere f32). Its accuracy on drawn scenes and its attention maps were measured to
/// hold (docs/benchmarks.md), and its UNet call is faster. Other models default to f32.
pub const BUNDLED_MODEL_PRODUCTS: ProductPrecision = ProductPrecision::Bf16;

/// The product precision of a model loaded from `source` with `products`: the model's default
/// ([`BUNDLED_MODEL_PRODUCTS`] for the bundled model, f32 for any other) unless the user chose.
pub fn product_precision_for(source: &ModelSource, products: Products) -> ProductPrecision {
    match products {
        Products::ModelDefault if matches!(source, ModelSource::Bundled) => BUNDLED_MODEL_PRODUCTS,
        Products::ModelDefault | Products::F32 => ProductPrecision::F32,
        Products::Bf16 => ProductPrecision::Bf16,
    }
}

/// Where the bundled model is: `$ATTEND_BUNDLED_MODEL`, else `assets/attend-shapes` next to the
/// executable or one of its parent folders, else in the source tree this binary was built from.
pub fn bundled_model_dir() -> PathBuf {
    if let Some(path) = std::env::var_os("ATTEND_BUNDLED_MODEL") {
        return PathBuf::from(path);
    }
    if let Ok(executable) = std::env::current_exe() {
        for folder in executable.ancestors().skip(1) {
            let candidate = folder.join(BUNDLED_MODEL_FOLDER);
            if candidate.is_dir() {
                return candidate;
            }
        }
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join(BUNDLED_MODEL_FOLDER)
}

/// Answers the probe's request for the running run, if one is waiting, from the maps stored so far.
fn answer_self_attention_query(
    observer: &mut dyn RunObserver,
    store: &AttentionStore,
) -> Result<(), EngineError> {
    let Some(query) = observer.take_self_attention_query() else {
        return Ok(());
    };
    let map = store.self_attention(
        query.grid_h,
        query.grid_w,
        &[UnetPlace::Down, UnetPlace::Mid, UnetPlace::Up],
        query.span,
    );
    Ok(observer.self_attention(query, map)?)
}

/// The factory the editor uses for real models.
pub fn pipeline_engine_factory() -> EngineFactory {
    std::sync::Arc::new(|| Box::new(PipelineEngine::default()))
}

// Edit mode.
mod edit;
// Real images.
mod image;
// Style sets.
mod style_set;
// Appearance transfer.
mod appearance;

/// What the engine keeps of its latest run.
struct LatestRun {
    store: AttentionStore,
    words: Vec<WordSpan>,
    tokens: Vec<String>,
    /// Image size `(height, width)` in pixels (Segments view).
    image_size: (usize, usize),
}

/// The real engine. See the module docs.
#[derive(Default)]
pub struct PipelineEngine {
    model: Option<StableDiffusion>,
    source: Option<ModelSource>,
    latest_run: Option<LatestRun>,
    // Edit mode.
    /// The recorded source of the editor's edits.
    edit_source: Option<edit::EditSource>,
    /// How many sources were recorded so far.
    source_recordings: u64,
    // Real images.
    /// The latest inversions, for runs that name their image.
    inversions: crate::worker::backend::InversionCache<image::CachedInversion>,
    /// How many images were inverted so far (a cached inversion does not count).
    inversions_computed: u64,
    // Style sets.
    /// Every image's attention of the latest style set.
    style_set: Option<style_set::StyleSetRecord>,
}

// Edit mode.
impl PipelineEngine {
    /// How many times this engine recorded an edit's source (an edit that reuses the recording
    /// does not count), for tests and diagnostics.
    pub fn source_recordings(&self) -> u64 {
        self.source_recordings
    }
}

impl Engine for PipelineEngine {
    fn load_model_observed(
        &mut self,
        source: &ModelSource,
        products: Products,
        progress: &mut dyn FnMut(ModelLoadProgress) -> Result<(), EngineError>,
    ) -> Result<ModelInfo, EngineError> {
        let dir = match source {
            ModelSource::Bundled => {
                let dir = bundled_model_dir();
                if !dir.is_dir() {
                    return Err(PipelineError::Missing {
                        what: "bundled model folder",
                        path: dir,
                    }
                    .into());
                }
                dir
            }
            ModelSource::Folder(path) | ModelSource::File(path) => path.clone(),
        };
        // The bundled model ships its UNet as the fp16 variant only; asking for that variant keeps
        // the "only fp16 files found" note (meant for user folders) out of the status line.
        let precision = product_precision_for(source, products);
        let options = LoadOptions {
            variant: match source {
                ModelSource::Bundled => crate::pipeline::weights::WeightVariant::Fp16,
                ModelSource::Folder(_) | ModelSource::File(_) => LoadOptions::default().variant,
            },
            products: precision,
            ..LoadOptions::default()
        };
        let model = StableDiffusion::load_observed(&dir, &options, &mut |stage| {
            progress(ModelLoadProgress {
                stage: stage.stage.to_owned(),
                index: stage.index,
                count: stage.count,
            })
            .map_err(|error| match error {
                EngineError::Pipeline(error) => error,
                _ => PipelineError::Cancelled,
            })
        })?;
        let (default_width_px, default_height_px) = model.default_size_px();
        let default_scheduler = model
            .scheduler_config
            .class_name
            .as_deref()
            .and_then(SchedulerKind::from_diffusers_class)
            .unwrap_or(SchedulerKind::Ddim);
        let info = ModelInfo {
            source: source.clone(),
            name: model.name().to_owned(),
            default_width_px,
            default_height_px,
            size_multiple_px: model.size_multiple_px(),
            default_scheduler: default_scheduler.name().to_owned(),
            schedulers: SchedulerKind::ALL
                .iter()
                .map(|kind| kind.name().to_owned())
                .collect(),
            warnings: model.load_warnings().to_vec(),
            edit_self_replace: SelfReplace::recommended(model.edit_defaults()),
            bf16_products: precision.uses_bf16_here(),
            bf16_products_available: crate::kernels::bf16_supported(),
        };
        self.model = Some(model);
        self.source = Some(source.clone());
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
        let (params, inversion) = self.replay_of(params)?;
        let (run, resolved) = edit::prepare(model, &params, inversion.as_ref())?;
        observer.started(Branch::Source, &resolved, prompt_info(&run), None)?;
        let mut store = AttentionStore::new(StoreConfig::new(run.prompt_tokens.token_count()));
        let words = run.prompt_tokens.words.clone();
        let tokens = run.prompt_tokens.tokens.clone();
        let image_size = (run.request.height, run.request.width);
        let result = sample_with_store(model, run, &mut store, observer, cancel);
        let self_attention_grids = store.self_attention_resolutions();
        // The store is kept even when the run stops early: its maps so far stay explorable.
        self.latest_run = Some(LatestRun {
            store,
            words,
            tokens,
            image_size,
        });
        Ok(RunOutput {
            image: result?.image,
            self_attention_grids,
        })
    }

    fn self_attention(
        &self,
        grid_h: usize,
        grid_w: usize,
        span: SelfAttentionSpan,
    ) -> Result<Option<SelfAttentionMap>, EngineError> {
        let Some(run) = &self.latest_run else {
            return Ok(None);
        };
        let store = &run.store;
        Ok(store.self_attention(
            grid_h,
            grid_w,
            &[UnetPlace::Down, UnetPlace::Mid, UnetPlace::Up],
            span,
        ))
    }

    fn write_attention(&self, path: &Path, word_heatmaps: &[Heatmap]) -> Result<(), EngineError> {
        let Some(run) = &self.latest_run else {
            return Err(EngineError::Unavailable("no run to export".to_owned()));
        };
        let store = &run.store;
        write_attention_safetensors(
            path,
            &store.cross_by_resolution(),
            word_heatmaps,
            &run.words,
            &run.tokens,
        )?;
        Ok(())
    }

    // Edit mode.
    fn generate_edit(
        &mut self,
        params: &GenerateParams,
        spec: Option<&crate::worker::protocol::EditSpec>,
        observer: &mut dyn RunObserver,
        cancel: &CancelToken,
    ) -> Result<crate::worker::backend::EditRunOutput, EngineError> {
        self.run_edit(params, spec, observer, cancel)
    }

    // Segments view: clusters the stored self-attention as `attend segment` does.
    fn segment(&self, request: &SegmentRequest) -> Result<LabelledSegmentation, EngineError> {
        let Some(run) = &self.latest_run else {
            return Err(EngineError::Unavailable("no run to segment".to_owned()));
        };
        let store = &run.store;
        let places = self_attention_places(request.settings.method);
        let maps: Vec<SelfAttentionMap> =
            requested_grids(request, &store.self_attention_resolutions())?
                .into_iter()
                .filter_map(|(h, w)| store.self_attention(h, w, places, request.span))
                .collect();
        let (image_h, image_w) = run.image_size;
        segment_run(&maps, store.steps(), &run.words, image_h, image_w, request)
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

/// The prompt facts of a prepared run, as the channel reports them.
fn prompt_info(run: &PreparedRun) -> PromptInfo {
    PromptInfo {
        words: run.prompt_tokens.words.clone(),
        tokens: run.prompt_tokens.tokens.clone(),
        warnings: run.warnings.clone(),
    }
}

/// One step's frame: the store's maps of the step just finished, the preview, the timings.
fn step_frame(
    store: &AttentionStore,
    place: StepPlace,
    preview: RgbImage,
    timing: StepTiming,
) -> StepFrame {
    StepFrame {
        step_index: place.step_index,
        step_count: place.step_count,
        timestep: place.timestep,
        preview,
        cross: Arc::new(store.latest_step().cloned().unwrap_or_else(|| StepCross {
            step_index: place.step_index,
            groups: Vec::new(),
        })),
        timing,
    }
}

/// Where a step is in its run.
#[derive(Clone, Copy)]
struct StepPlace {
    step_index: usize,
    step_count: usize,
    timestep: f64,
}

impl From<&StepReport> for StepPlace {
    fn from(report: &StepReport) -> Self {
        Self {
            step_index: report.step_index,
            step_count: report.step_count,
            timestep: report.timestep,
        }
    }
}

/// Samples `run` to the end with `store` on the attention hook, sending a frame after every step
/// and answering the probe between steps. Stops at the first error, which is returned as itself.
fn sample_with_store(
    model: &StableDiffusion,
    run: PreparedRun,
    store: &mut AttentionStore,
    observer: &mut dyn RunObserver,
    cancel: &CancelToken,
) -> Result<crate::pipeline::sampling::GenerateOutput, EngineError> {
    // The prompt syntax's weights scale the cross-attention the store records.
    let weights = PromptWeights::new(&run.prompt_tokens.weights);
    let mut sampler = WeightedRun::new(
        Sampler::new(model, run)?.with_cancel(cancel.clone()),
        weights,
    );
    drive_with_store(&mut sampler, store, cancel, |report, store, timing| {
        let preview = report.preview.clone().unwrap_or_default();
        let frame = step_frame(store, StepPlace::from(report), preview, timing);
        observer.step(Branch::Source, frame, None)?;
        answer_self_attention_query(&mut *observer, store)
    })?;
    Ok(sampler.into_inner().finish()?)
}

/// Steps `run` to its end with `store` on the attention hook: the cancel token is checked before
/// every step, and `after_step` gets each step's report with the store as that step left it (to
/// send a frame, answer the probe). The first error ends the run and is returned as itself.
fn drive_with_store<R: StepwiseRun>(
    run: &mut R,
    store: &mut AttentionStore,
    cancel: &CancelToken,
    mut after_step: impl FnMut(&R::Report, &AttentionStore, StepTiming) -> Result<(), EngineError>,
) -> Result<(), EngineError> {
    let started_at = Instant::now();
    loop {
        if cancel.is_cancelled() {
            return Err(EngineError::Cancelled);
        }
        let step_started = Instant::now();
        let Some(report) = run.next_step(Some(&mut *store))? else {
            return Ok(());
        };
        let timing = StepTiming {
            step_secs: step_started.elapsed().as_secs_f64(),
            elapsed_secs: started_at.elapsed().as_secs_f64(),
        };
        after_step(&report, store, timing)?;
    }
}

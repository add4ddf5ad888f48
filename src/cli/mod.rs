//! Command-line interface. Each subcommand lives in its own file with its arguments and its `run`.

mod appearance_eval;
mod appearance_transfer;
mod bench;
mod bench_edit;
mod checks;
mod edit;
mod edit_eval;
mod eval_shapes;
mod generate;
mod images;
mod invert;
mod invert_eval;
mod models;
mod scenes;
mod segment;
mod segment_eval;
mod style_aligned;
mod style_eval;

use std::path::PathBuf;

/// attend: see and edit the attention of text-to-image diffusion models.
///
/// Without a subcommand, opens the editor window on the bundled model.
#[derive(Debug, clap::Parser)]
#[command(name = "attend", version, about, long_about = None)]
pub struct Cli {
    /// Subcommand; none opens the editor.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Editor: prompt to start with.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Editor: seed to start with.
    #[arg(long, value_parser = checks::non_negative, allow_negative_numbers = true)]
    pub seed: Option<u64>,
    /// Editor: model folder (diffusers layout) or single-file checkpoint (.safetensors); default:
    /// the bundled model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Editor: start generating at once (for demos and screenshots).
    #[arg(long)]
    pub generate: bool,
    /// Editor: reopen a saved session file and regenerate it.
    #[arg(long)]
    pub session: Option<PathBuf>,
}

/// The scripting subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Generate one image from a prompt, with its attention maps on request.
    Generate(generate::GenerateArgs),
    /// Benchmarks (UNet step time with and without attention capture).
    Bench(bench::BenchArgs),
    /// Measure a model on generator scenes: object accuracy, attention IoU, seconds per image.
    EvalShapes(eval_shapes::EvalShapesArgs),
    /// Write drawn scenes (images, masks, captions) from attend's deterministic generator.
    Scenes(scenes::ScenesArgs),
    /// Prompt-to-Prompt: generate a source image and an edited one (word swap, refine, reweight, local blend).
    Edit(edit::EditArgs),
    /// Invert a given image with a prompt that describes it; write its inversion, its reconstruction
    /// and how close that is (PSNR).
    Invert(invert::InvertArgs),
    /// Measure inversion on drawn scenes: reconstruction PSNR and seconds per inversion, per method.
    InvertEval(invert_eval::InvertEvalArgs),
    /// Segment an image from its self-attention and label the segments with prompt words.
    Segment(segment::SegmentArgs),
    /// Measure Prompt-to-Prompt word swaps and reweights on the bundled model over fixed seeds.
    EditEval(edit_eval::EditEvalArgs),
    /// Measure segmentation (mIoU, label accuracy, time) on the bundled model over fixed scenes.
    SegmentEval(segment_eval::SegmentEvalArgs),
    /// List the models on this machine: Hugging Face cache, A1111 / ComfyUI folders, --search-dir.
    Models(models::ModelsArgs),
    /// Style Aligned: a reference prompt and target prompts in one batch sharing the reference's style.
    StyleAligned(style_aligned::StyleAlignedArgs),
    /// Measure Style Aligned on the bundled model: targets taking the reference's background, objects kept, time.
    StyleEval(style_eval::StyleEvalArgs),
    /// Cross-image attention: draw the structure image's layout with the appearance image's look.
    AppearanceTransfer(appearance_transfer::AppearanceTransferArgs),
    /// Measure appearance transfer on the bundled model over drawn pairs it never saw.
    AppearanceEval(appearance_eval::AppearanceEvalArgs),
}

/// Run what the command line asks for.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::Generate(args)) => generate::run(&args),
        Some(Command::Scenes(args)) => scenes::run(&args),
        Some(Command::Bench(args)) => bench::run(&args),
        Some(Command::EvalShapes(args)) => eval_shapes::run(&args),
        Some(Command::Edit(args)) => edit::run(&args),
        Some(Command::Invert(args)) => invert::run(&args),
        Some(Command::InvertEval(args)) => invert_eval::run(&args),
        Some(Command::Segment(args)) => segment::run(&args),
        Some(Command::EditEval(args)) => edit_eval::run(&args),
        Some(Command::SegmentEval(args)) => segment_eval::run(&args),
        Some(Command::Models(args)) => models::run(&args),
        Some(Command::StyleAligned(args)) => style_aligned::run(&args),
        Some(Command::StyleEval(args)) => style_eval::run(&args),
        Some(Command::AppearanceTransfer(args)) => appearance_transfer::run(&args),
        Some(Command::AppearanceEval(args)) => appearance_eval::run(&args),
        None => attend::ui::run_editor(
            attend::ui::EditorOptions {
                prompt: cli.prompt,
                seed: cli.seed,
                model: cli.model,
                generate: cli.generate,
                session: cli.session,
                ..attend::ui::EditorOptions::default()
            }
            .with_environment(),
        ),
    }
}

/// Sampling settings shared by `generate` and `edit` (the same flags, the same meaning).
#[derive(Debug, Clone, clap::Args)]
pub struct SamplingArgs {
    /// Negative prompt (the unconditional half of classifier-free guidance).
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = 0, value_parser = checks::non_negative, allow_negative_numbers = true)]
    pub seed: u64,
    /// Denoising steps.
    #[arg(long, default_value_t = 30, value_parser = checks::at_least_one, allow_negative_numbers = true)]
    pub steps: usize,
    /// Classifier-free guidance scale (<= 1 disables guidance).
    #[arg(long, default_value_t = 7.5, allow_hyphen_values = true)]
    pub guidance: f64,
    /// Scheduler: ddim, euler, euler-a or dpmpp-2m (default: the model's own).
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Image width in pixels (default: the model's native size).
    #[arg(long, value_parser = checks::at_least_one, allow_negative_numbers = true)]
    pub width: Option<usize>,
    /// Image height in pixels (default: the model's native size).
    #[arg(long, value_parser = checks::at_least_one, allow_negative_numbers = true)]
    pub height: Option<usize>,
    /// Safetensors file with a unit-variance tensor `latents` `[1, C, h, w]` used as the initial noise
    /// (scaled by the scheduler's init noise sigma, as diffusers does).
    #[arg(long)]
    pub init_latents: Option<PathBuf>,
}

impl SamplingArgs {
    /// A request for `prompt` with these settings (the model's defaults where a flag is absent).
    pub fn request(
        &self,
        model: &attend::pipeline::model::StableDiffusion,
        prompt: &str,
    ) -> anyhow::Result<attend::pipeline::sampling::GenerateRequest> {
        use anyhow::Context as _;
        let mut request = attend::pipeline::sampling::GenerateRequest::new(model, prompt);
        request.negative_prompt.clone_from(&self.negative_prompt);
        request.seed = self.seed;
        request.steps = self.steps;
        request.guidance = self.guidance;
        request.scheduler = self
            .scheduler
            .as_deref()
            .map(str::parse::<attend::pipeline::scheduler::SchedulerKind>)
            .transpose()
            .context("--scheduler")?;
        request.width = self.width.unwrap_or(request.width);
        request.height = self.height.unwrap_or(request.height);
        if let Some(path) = &self.init_latents {
            request.init_latents = Some(read_init_latents(path)?);
        }
        Ok(request)
    }

    /// Checks the flags that need no model (the scheduler name, a finite guidance, the initial
    /// noise file), so a bad value fails at once.
    pub fn check(&self) -> anyhow::Result<()> {
        use anyhow::Context as _;
        anyhow::ensure!(
            self.guidance.is_finite(),
            "invalid --guidance: {} is not a finite number",
            self.guidance
        );
        if let Some(path) = &self.init_latents {
            anyhow::ensure!(
                path.is_file(),
                "--init-latents {}: no such file",
                path.display()
            );
        }
        if let Some(name) = &self.scheduler {
            name.parse::<attend::pipeline::scheduler::SchedulerKind>()
                .context("--scheduler")?;
        }
        Ok(())
    }
}

/// Reads the unit-variance tensor `latents` from a safetensors file.
fn read_init_latents(path: &std::path::Path) -> anyhow::Result<candle_core::Tensor> {
    use anyhow::Context as _;
    let tensors =
        candle_core::safetensors::load(path, &candle_core::Device::Cpu).with_context(|| {
            format!(
                "--init-latents {}: not a readable safetensors file",
                path.display()
            )
        })?;
    let latents = tensors.get("latents").with_context(|| {
        format!(
            "--init-latents {}: no tensor named `latents`",
            path.display()
        )
    })?;
    Ok(latents.to_dtype(candle_core::DType::F32)?)
}

/// Model selection shared by the subcommands.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ModelArgs {
    /// Model folder in diffusers layout (model_index.json, unet/, text_encoder/, tokenizer/, scheduler/,
    /// vae/) or a single-file SD 1.x/2.x checkpoint (.safetensors, LDM / A1111 layout). Default: the
    /// bundled model.
    #[arg(long = "model", value_name = "PATH", conflicts_with = "random_weights")]
    pub dir: Option<PathBuf>,
    /// For timing only: a model with the shapes of a manifest (`configs.text_encoder`, `.unet`,
    /// `.vae`, as tests/fixtures/manifests/sd15.json) and made-up weights; its images are noise.
    #[arg(long, value_name = "MANIFEST")]
    pub random_weights: Option<PathBuf>,
    /// Prefer the `.fp16.safetensors` weights when a folder has both.
    #[arg(long)]
    pub fp16_weights: bool,
    /// What the UNet predicts: epsilon, v_prediction or sample. Default: the folder's scheduler
    /// config; for a single file, v_prediction with SD 2.x 768 shapes, else epsilon (SD 2.x base and
    /// SD-Turbo files need `--prediction-type epsilon`).
    #[arg(long, value_parser = parse_prediction_type)]
    pub prediction_type: Option<attend::pipeline::scheduler::PredictionType>,
    /// How the UNet's matrix products treat their operands. Default: bf16 for the bundled model
    /// (measured to keep its accuracy, and faster), f32 for every other model.
    #[arg(long, value_enum)]
    pub products: Option<ProductsArg>,
}

/// How the UNet's matrix products treat their operands (`--products`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProductsArg {
    /// f32 operands: the reference, within 1e-4 of diffusers.
    F32,
    /// Operands rounded to bf16 with f32 sums (AVX-512 BF16 CPUs; elsewhere f32).
    Bf16,
}

impl From<ProductsArg> for attend::kernels::ProductPrecision {
    fn from(products: ProductsArg) -> Self {
        match products {
            ProductsArg::F32 => Self::F32,
            ProductsArg::Bf16 => Self::Bf16,
        }
    }
}

fn parse_prediction_type(
    text: &str,
) -> Result<attend::pipeline::scheduler::PredictionType, String> {
    attend::pipeline::checkpoint::parse_prediction_type(text)
}

/// The `configs.<component>` object of a shape manifest (as tests/fixtures/manifests/sd15.json),
/// or the whole file when it is a bare `config.json`, as JSON text; errors name the file.
pub fn manifest_component_json(path: &std::path::Path, component: &str) -> anyhow::Result<String> {
    use anyhow::Context as _;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let config = json
        .pointer(&format!("/configs/{component}"))
        .cloned()
        .unwrap_or(json);
    Ok(config.to_string())
}

/// Fails when `--model` names a file that is not a `.safetensors` checkpoint (pickles are refused
/// by the loader with the way to convert them), before the loader's "not found".
pub fn check_model_dir(path: &std::path::Path) -> anyhow::Result<()> {
    if let Ok(metadata) = std::fs::metadata(path) {
        let is_checkpoint = path.extension().is_some_and(|extension| {
            extension.eq_ignore_ascii_case("safetensors")
                || attend::pipeline::checkpoint::is_pickle_path(path)
        });
        anyhow::ensure!(
            metadata.is_dir() || is_checkpoint,
            "--model {}: not a model folder or a .safetensors checkpoint (expected a folder in \
             diffusers layout with model_index.json, unet/, text_encoder/, tokenizer/ and scheduler/, \
             or a single-file SD checkpoint)",
            path.display()
        );
    }
    Ok(())
}

impl ModelArgs {
    /// `--products`, else the model's default: the bundled model's precision for the bundled
    /// model, f32 for every other model.
    pub fn product_precision(&self) -> attend::kernels::ProductPrecision {
        let bundled = self.dir.is_none() && self.random_weights.is_none();
        self.products.map_or(
            if bundled {
                attend::worker::BUNDLED_MODEL_PRODUCTS
            } else {
                attend::kernels::ProductPrecision::F32
            },
            attend::kernels::ProductPrecision::from,
        )
    }
}

/// Loads the chosen model (the bundled one by default), with a clear message when it is missing.
pub fn load_model(args: &ModelArgs) -> anyhow::Result<attend::pipeline::model::StableDiffusion> {
    use anyhow::Context as _;
    let mut options = attend::pipeline::model::LoadOptions {
        prediction_type: args.prediction_type,
        products: args.product_precision(),
        ..attend::pipeline::model::LoadOptions::default()
    };
    let model = if let Some(manifest) = &args.random_weights {
        attend::pipeline::model::StableDiffusion::with_random_weights(manifest, &options, 0)
            .with_context(|| format!("cannot build a model from {}", manifest.display()))?
    } else {
        let dir = match &args.dir {
            Some(dir) => {
                check_model_dir(dir)?;
                dir.clone()
            }
            None => {
                let dir = attend::worker::bundled_model_dir();
                anyhow::ensure!(
                    dir.join("model_index.json").is_file(),
                    "the bundled model is missing from {} (it ships with attend's source tree); pass --model DIR",
                    dir.display()
                );
                dir
            }
        };
        // The bundled model ships its UNet as the fp16 variant only (no note needed about that).
        if args.fp16_weights || args.dir.is_none() {
            options.variant = attend::pipeline::weights::WeightVariant::Fp16;
        }
        attend::pipeline::model::StableDiffusion::load(&dir, &options)
            .with_context(|| format!("cannot load model {}", dir.display()))?
    };
    for warning in model.load_warnings() {
        eprintln!("warning: {warning}");
    }
    Ok(model)
}

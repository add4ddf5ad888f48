//! Command-line interface. Each subcommand lives in its own file with its arguments and its `run`.

mod bench;
mod edit;
mod eval_shapes;
mod generate;
mod scenes;
mod segment;

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
    #[arg(long)]
    pub seed: Option<u64>,
    /// Editor: model folder (diffusers layout); default: the bundled model.
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
    /// Segment an image from its self-attention and label the segments with prompt words.
    Segment(segment::SegmentArgs),
    /// Measure Prompt-to-Prompt word swaps and reweights on the bundled model over fixed seeds.
    EditEval(edit::EditEvalArgs),
    /// Measure segmentation (mIoU, label accuracy, time) on the bundled model over fixed scenes.
    SegmentEval(segment::SegmentEvalArgs),
}

/// Run what the command line asks for.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::Generate(args)) => generate::run(&args),
        Some(Command::Scenes(args)) => scenes::run(&args),
        Some(Command::Bench(args)) => bench::run(&args),
        Some(Command::EvalShapes(args)) => eval_shapes::run(&args),
        Some(Command::Edit(args)) => edit::run(&args),
        Some(Command::Segment(args)) => segment::run(&args),
        Some(Command::EditEval(args)) => edit::run_eval(&args),
        Some(Command::SegmentEval(args)) => segment::run_eval(&args),
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

/// Where the bundled model lives (`assets/attend-shapes` in the source tree).
pub fn bundled_model_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/attend-shapes"))
}

/// Model selection shared by the subcommands.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// Model folder in diffusers layout (model_index.json, unet/, text_encoder/, tokenizer/, scheduler/,
    /// vae/). Default: the bundled model.
    #[arg(long = "model", value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Prefer the `.fp16.safetensors` weights when a folder has both.
    #[arg(long)]
    pub fp16_weights: bool,
}

/// Loads the chosen model (the bundled one by default), with a clear message when it is missing.
pub fn load_model(args: &ModelArgs) -> anyhow::Result<attend::pipeline::model::StableDiffusion> {
    use anyhow::Context as _;
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => {
            let dir = bundled_model_dir();
            anyhow::ensure!(
                dir.join("model_index.json").is_file(),
                "the bundled model is missing from {} (it ships with attend's source tree); pass --model DIR",
                dir.display()
            );
            dir
        }
    };
    let mut options = attend::pipeline::model::LoadOptions::default();
    if args.fp16_weights {
        options.variant = attend::pipeline::weights::WeightVariant::Fp16;
    }
    let model = attend::pipeline::model::StableDiffusion::load(&dir, &options)
        .with_context(|| format!("cannot load model {}", dir.display()))?;
    for warning in model.load_warnings() {
        eprintln!("warning: {warning}");
    }
    Ok(model)
}

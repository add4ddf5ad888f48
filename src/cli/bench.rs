//! `attend bench unet`: median seconds of one UNet call with a classifier-free-guidance batch of 2,
//! with or without attention capture (the [`AttentionStore`] of the editor).

use std::collections::BTreeMap;
use std::io::{BufRead as _, Write as _};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use attend::attention::store::{AttentionStore, StoreConfig};
use attend::hook::{AttentionHook, AttentionProcessor};
use attend::pipeline::limits::{available_memory, check_unet_call, ModelFootprint, RunCapture};
use attend::pipeline::profile::{self, StageTotal};
use attend::pipeline::rng::NoiseRng;
use attend::pipeline::unet::config::UnetConfig;
use attend::pipeline::unet::Unet;
use attend::pipeline::vae::{AutoencoderKl, VaeConfig};
use attend::pipeline::weights::RandomWeights;
use candle_core::{DType, Device};

use super::checks::at_least_one;
use super::{load_model, manifest_component_json};

/// Benchmarks.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// What to measure.
    #[command(subcommand)]
    pub target: BenchTarget,
}

/// What `attend bench` can measure.
#[derive(Debug, clap::Subcommand)]
pub enum BenchTarget {
    /// One UNet call (CFG batch of 2).
    Unet(UnetBenchArgs),
    /// One VAE decode (batch of 1).
    Vae(VaeBenchArgs),
    /// Loading a model (diffusers folder or single-file checkpoint).
    Load(super::models::LoadBenchArgs),
    /// The editor's answers through the worker: first heat map, a full run, edits after a slider.
    Edit(super::bench_edit::EditBenchArgs),
}

/// Which network `bench unet` / `bench vae` time.
#[derive(Debug, clap::Args)]
pub struct BenchNetworkArgs {
    /// Model folder whose network (and text width) to use. Default: the bundled model.
    #[arg(long, value_name = "DIR", conflicts_with = "random_weights")]
    pub model: Option<PathBuf>,
    /// Instead of a model folder: the network's `config.json` (or a shape manifest such as SD
    /// 1.5's, whose `configs.unet` / `configs.vae` is used) built with random weights in memory,
    /// nothing read or written.
    #[arg(long, value_name = "MANIFEST", alias = "random-config")]
    pub random_weights: Option<PathBuf>,
}

/// Arguments of `attend bench unet`.
#[derive(Debug, clap::Args)]
pub struct UnetBenchArgs {
    #[command(flatten)]
    pub network: BenchNetworkArgs,
    /// Image width in pixels.
    #[arg(long, default_value_t = 512, value_parser = at_least_one, allow_negative_numbers = true)]
    pub width: usize,
    /// Image height in pixels.
    #[arg(long, default_value_t = 512, value_parser = at_least_one, allow_negative_numbers = true)]
    pub height: usize,
    /// Pixels per latent cell (8 for SD; 1 for pixel-space models); default: from the model.
    #[arg(long, value_parser = at_least_one, allow_negative_numbers = true)]
    pub latent_factor: Option<usize>,
    /// Capture attention as the editor does (cross-attention of every layer, self-attention up to 32x32).
    #[arg(long)]
    pub capture: bool,
    /// How the UNet's matrix products treat their operands.
    #[arg(long, value_enum, default_value_t = super::ProductsArg::F32)]
    pub products: super::ProductsArg,
    /// Tokens kept per cross-attention map when capturing (a prompt of about 8 words).
    #[arg(long, default_value_t = 12, value_parser = at_least_one, allow_negative_numbers = true)]
    pub capture_tokens: usize,
    /// Timed calls (after one warm-up call).
    #[arg(long, default_value_t = 3, value_parser = at_least_one, allow_negative_numbers = true)]
    pub iters: usize,
    /// Print one JSON line instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also print where the timed calls spent their time, per layer kind and size (convolutions,
    /// linear layers, attention, norms; the rest is "unlabelled"), summed over the timed calls.
    #[arg(long)]
    pub profile: bool,
    /// Paced by a driver: after the warm-up call print `ready`, then before each timed call wait
    /// for a line on standard input and print that call's seconds as a line of its own (so a
    /// script can alternate with another program call by call; see
    /// `scripts/bench_unet_paced.py`). Standard input closing ends the calls early.
    #[arg(long)]
    pub paced: bool,
}

/// Arguments of `attend bench vae`.
#[derive(Debug, clap::Args)]
pub struct VaeBenchArgs {
    #[command(flatten)]
    pub network: BenchNetworkArgs,
    /// Image width in pixels.
    #[arg(long, default_value_t = 512, value_parser = at_least_one, allow_negative_numbers = true)]
    pub width: usize,
    /// Image height in pixels.
    #[arg(long, default_value_t = 512, value_parser = at_least_one, allow_negative_numbers = true)]
    pub height: usize,
    /// Timed decodes (after one warm-up decode).
    #[arg(long, default_value_t = 3, value_parser = at_least_one, allow_negative_numbers = true)]
    pub iters: usize,
    /// Print one JSON line instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also print where the timed decodes spent their time (as `bench unet --profile`).
    #[arg(long)]
    pub profile: bool,
}

/// Run `attend bench`.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    match &args.target {
        BenchTarget::Unet(unet_args) => bench_unet(unet_args),
        BenchTarget::Vae(vae_args) => bench_vae(vae_args),
        BenchTarget::Load(load_args) => super::models::bench_load(load_args),
        BenchTarget::Edit(edit_args) => super::bench_edit::bench_edit(edit_args),
    }
}

/// For `--paced`: announces `ready` before the first timed call, then waits for a line on
/// standard input; `false` where standard input has closed.
fn paced_go(first: bool) -> anyhow::Result<bool> {
    if first {
        println!("ready");
        std::io::stdout().flush()?;
    }
    let mut line = String::new();
    let read = std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the pacing line from standard input")?;
    Ok(read > 0)
}

fn bench_unet(args: &UnetBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.iters >= 1, "--iters must be at least 1");
    let device = Device::Cpu;
    let (mut unet, latent_factor) = match (&args.network.model, &args.network.random_weights) {
        (_, Some(path)) => {
            let config = UnetConfig::from_json(&manifest_component_json(path, "unet")?, path)?;
            let vb = RandomWeights::new(0).var_builder(DType::F32, &device);
            // Built for its products, as a loaded model is.
            let unet = attend::kernels::with_product_precision(args.products.into(), || {
                Unet::new(vb, &config)
            })?;
            (unet, args.latent_factor.unwrap_or(8))
        }
        (Some(dir), None) => {
            let model = load_model(&super::ModelArgs {
                dir: Some(dir.clone()),
                products: Some(args.products),
                ..super::ModelArgs::default()
            })?;
            let factor = args
                .latent_factor
                .unwrap_or_else(|| model.latent_downscale_factor());
            (model.unet, factor)
        }
        (None, None) => {
            let model = load_model(&super::ModelArgs {
                products: Some(args.products),
                ..super::ModelArgs::default()
            })?;
            let factor = args
                .latent_factor
                .unwrap_or_else(|| model.latent_downscale_factor());
            (model.unet, factor)
        }
    };
    unet.set_product_precision(args.products.into());
    let config = unet.config().clone();
    anyhow::ensure!(latent_factor > 0, "--latent-factor must be at least 1");
    anyhow::ensure!(
        args.width.is_multiple_of(latent_factor) && args.height.is_multiple_of(latent_factor),
        "--width {} / --height {} must be multiples of the latent factor {latent_factor}",
        args.width,
        args.height
    );
    let footprint = ModelFootprint::unet_only(&config, latent_factor, 77, DType::F32, true);
    let capture = if args.capture {
        RunCapture::store(args.capture_tokens, 32)
    } else {
        RunCapture::none()
    };
    let size = (args.width, args.height);
    check_unet_call(
        &footprint,
        size,
        latent_factor,
        &capture,
        &available_memory(),
    )?;
    let (latent_h, latent_w) = (args.height / latent_factor, args.width / latent_factor);
    let halvings = config
        .down_blocks()
        .iter()
        .filter(|block| block.downsample)
        .count();
    let multiple = latent_factor << halvings;
    anyhow::ensure!(
        args.width.is_multiple_of(multiple) && args.height.is_multiple_of(multiple),
        "--width {} / --height {} must be multiples of {multiple} (the latent factor \
         {latent_factor} times 2 for each of the UNet's {halvings} down-samplings)",
        args.width,
        args.height
    );
    let mut rng = NoiseRng::new(1);
    let sample = rng.randn(vec![2, config.in_channels, latent_h, latent_w], &device)?;
    let text_width = config
        .cross_attention_dim
        .resolve(1)
        .and_then(|dims| dims.first().copied())
        .context("per-block cross_attention_dim is not supported by the benchmark")?;
    let context = rng.randn(vec![2, 77, text_width], &device)?;
    let mut store = AttentionStore::new(StoreConfig::new(args.capture_tokens));
    let mut seconds = Vec::with_capacity(args.iters);
    let mut total_seconds = 0.0;
    for iteration in 0..=args.iters {
        if args.paced && iteration > 0 && !paced_go(iteration == 1)? {
            break;
        }
        store.clear();
        profile::set_enabled(args.profile && iteration > 0);
        let started = Instant::now();
        let output = {
            let mut hook = args.capture.then_some(AttentionHook {
                processor: &mut store as &mut dyn AttentionProcessor,
                step_index: 0,
                step_count: 1,
                cfg: true,
                cancel: None,
            });
            unet.forward(&sample, 500.0, &context, hook.as_mut())?
        };
        if args.capture {
            store.finish_step()?;
        }
        // Make sure the work is done (candle's CPU ops are eager, but be explicit).
        let _ = output.dims();
        if iteration > 0 {
            let elapsed = started.elapsed().as_secs_f64();
            seconds.push(elapsed);
            total_seconds += elapsed;
            if args.paced {
                println!("{elapsed:.6}");
                std::io::stdout().flush()?;
            }
        }
    }
    profile::set_enabled(false);
    anyhow::ensure!(
        !seconds.is_empty(),
        "bench unet --paced: standard input closed before the first timed call"
    );
    seconds.sort_by(f64::total_cmp);
    let median = seconds[seconds.len() / 2];
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "unet_step_secs": median,
                "capture": args.capture,
                "width": args.width,
                "height": args.height,
                "iters": args.iters,
                "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            })
        );
    } else {
        println!(
            "UNet call, CFG batch 2, {}x{} px (latent {latent_h}x{latent_w}), capture {}: median {median:.3} s over {} calls (min {:.3}, max {:.3})",
            args.width,
            args.height,
            if args.capture { "on" } else { "off" },
            seconds.len(),
            seconds[0],
            seconds[seconds.len() - 1]
        );
    }
    if args.profile {
        print_profile(profile::take_totals(), total_seconds, args.iters);
    }
    Ok(())
}

fn bench_vae(args: &VaeBenchArgs) -> anyhow::Result<()> {
    let device = Device::Cpu;
    let vae = match (&args.network.model, &args.network.random_weights) {
        (_, Some(path)) => {
            let config = VaeConfig::from_json(&manifest_component_json(path, "vae")?, path)?;
            let vb = RandomWeights::new(0).var_builder(DType::F32, &device);
            AutoencoderKl::new(vb, &config)?
        }
        (model_dir, None) => {
            let model = load_model(&super::ModelArgs {
                dir: model_dir.clone(),
                ..super::ModelArgs::default()
            })?;
            model
                .vae
                .context("the model has no VAE (a pixel-space model decodes nothing)")?
        }
    };
    let factor = vae.downscale_factor();
    anyhow::ensure!(
        args.width.is_multiple_of(factor) && args.height.is_multiple_of(factor),
        "--width {} / --height {} must be multiples of the VAE's factor {factor}",
        args.width,
        args.height
    );
    let mut rng = NoiseRng::new(1);
    let latents = rng.randn(
        vec![
            1,
            vae.config().latent_channels,
            args.height / factor,
            args.width / factor,
        ],
        &device,
    )?;
    let mut seconds = Vec::with_capacity(args.iters);
    let mut total_seconds = 0.0;
    for iteration in 0..=args.iters {
        profile::set_enabled(args.profile && iteration > 0);
        let started = Instant::now();
        let image = vae.decode(&latents)?;
        let _ = image.dims();
        if iteration > 0 {
            let elapsed = started.elapsed().as_secs_f64();
            seconds.push(elapsed);
            total_seconds += elapsed;
        }
    }
    profile::set_enabled(false);
    seconds.sort_by(f64::total_cmp);
    let median = seconds[seconds.len() / 2];
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "vae_decode_secs": median,
                "width": args.width,
                "height": args.height,
                "iters": args.iters,
                "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            })
        );
    } else {
        println!(
            "VAE decode, batch 1, {}x{} px: median {median:.3} s over {} decodes (min {:.3}, max {:.3})",
            args.width,
            args.height,
            seconds.len(),
            seconds[0],
            seconds[seconds.len() - 1]
        );
    }
    if args.profile {
        print_profile(profile::take_totals(), total_seconds, args.iters);
    }
    Ok(())
}

/// The stage table of `--profile`: most expensive first, with each stage's share of the timed
/// calls' wall time, then what no stage covered.
fn print_profile(totals: BTreeMap<String, StageTotal>, total_seconds: f64, calls: usize) {
    let mut rows: Vec<(String, StageTotal)> = totals.into_iter().collect();
    rows.sort_by_key(|row| std::cmp::Reverse(row.1.elapsed));
    let per_call = |seconds: f64| seconds / calls as f64 * 1e3;
    println!("stage (summed over {calls} timed calls)  ms/UNet-call  share  runs/UNet-call");
    let mut covered = 0.0;
    for (label, total) in &rows {
        let seconds = total.elapsed.as_secs_f64();
        covered += seconds;
        println!(
            "{label:<60} {:>9.1} {:>5.1}% {:>6}",
            per_call(seconds),
            100.0 * seconds / total_seconds.max(f64::MIN_POSITIVE),
            total.calls / calls as u64
        );
    }
    let rest = (total_seconds - covered).max(0.0);
    println!(
        "{:<60} {:>9.1} {:>5.1}%",
        "unlabelled",
        per_call(rest),
        100.0 * rest / total_seconds.max(f64::MIN_POSITIVE)
    );
}

//! `attend models`: the models found on this machine (Hugging Face cache, A1111 / ComfyUI folders,
//! `--search-dir`, `$ATTEND_MODEL_DIRS`), and `attend bench load`: how long a model takes to load.

use std::path::PathBuf;
use std::time::Instant;

use attend::pipeline::discovery::{discover, ModelFormat, SearchLocations, MODEL_DIRS_VARIABLE};

use super::checks::at_least_one;

/// Arguments of `attend models`.
#[derive(Debug, clap::Args)]
pub struct ModelsArgs {
    /// Another folder to search (repeatable): checkpoints (`*.safetensors`), diffusers folders, or an
    /// A1111 / ComfyUI installation. `$ATTEND_MODEL_DIRS` adds more.
    #[arg(long = "search-dir", value_name = "DIR")]
    pub search_dirs: Vec<PathBuf>,
    /// Print one JSON object per line (name, path, format, origin).
    #[arg(long)]
    pub json: bool,
}

/// Run `attend models`.
pub fn run(args: &ModelsArgs) -> anyhow::Result<()> {
    for dir in &args.search_dirs {
        anyhow::ensure!(dir.is_dir(), "--search-dir {}: not a folder", dir.display());
    }
    let locations = SearchLocations::from_environment(&args.search_dirs);
    let models = discover(&locations, &[]);
    if args.json {
        for model in &models {
            let line = serde_json::json!({
                "name": model.name,
                "path": model.path,
                "format": model.format.label(),
                "origin": model.origin.label(),
            });
            println!("{line}");
        }
        return Ok(());
    }
    if models.is_empty() {
        println!("No models found. Searched:");
    } else {
        for model in &models {
            let note = if model.format == ModelFormat::Pickle {
                " (pickle: attend will not open it; convert it to .safetensors)"
            } else {
                ""
            };
            println!(
                "{}\n    {}  [{}; {}]{note}",
                model.name,
                model.path.display(),
                model.format.label(),
                model.origin.label()
            );
        }
        println!("\nSearched:");
    }
    for root in &locations.hf_caches {
        println!("  {} (Hugging Face cache)", root.display());
    }
    for folder in &locations.folders {
        println!("  {}", folder.display());
    }
    println!(
        "Add folders with --search-dir DIR or {MODEL_DIRS_VARIABLE}; load one with --model PATH."
    );
    Ok(())
}

/// Arguments of `attend bench load`.
#[derive(Debug, clap::Args)]
pub struct LoadBenchArgs {
    /// The model: a diffusers folder or a single-file checkpoint.
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// Timed loads (the first one also warms the page cache).
    #[arg(long, default_value_t = 3, value_parser = at_least_one, allow_negative_numbers = true)]
    pub iters: usize,
    /// Load the weights as f16 instead of f32.
    #[arg(long)]
    pub f16: bool,
}

/// Run `attend bench load`: seconds per load, each timed load after one untimed one.
pub fn bench_load(args: &LoadBenchArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let options = attend::pipeline::model::LoadOptions {
        dtype: if args.f16 {
            candle_core::DType::F16
        } else {
            candle_core::DType::F32
        },
        ..attend::pipeline::model::LoadOptions::default()
    };
    let load = || {
        attend::pipeline::model::StableDiffusion::load(&args.model, &options)
            .with_context(|| format!("cannot load model {}", args.model.display()))
    };
    drop(load()?);
    let mut seconds = Vec::with_capacity(args.iters);
    for _ in 0..args.iters {
        let start = Instant::now();
        let model = load()?;
        seconds.push(start.elapsed().as_secs_f64());
        drop(model);
    }
    seconds.sort_by(f64::total_cmp);
    let median = seconds[seconds.len() / 2];
    println!(
        "load {}: median {median:.3} s over {} loads (min {:.3} s, max {:.3} s)",
        args.model.display(),
        seconds.len(),
        seconds[0],
        seconds[seconds.len() - 1]
    );
    Ok(())
}

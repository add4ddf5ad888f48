//! `attend scenes`: write drawn scenes from the deterministic generator.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use attend::analysis::export::{write_atomically, write_png_rgb};
use attend::scenes::{generate_scene, SceneOptions};

use super::checks::{at_least_one, non_negative, OutDir};

/// Largest `--size`: the generator draws on the CPU, one scene at a time.
const MAX_SCENE_SIZE_PX: usize = 4096;

/// Largest raw image file (`--format raw` keeps every image in memory before writing).
const MAX_RAW_BYTES: usize = 8 << 30;

/// Arguments of `attend scenes`.
#[derive(Debug, clap::Args)]
pub struct ScenesArgs {
    /// Number of scenes.
    #[arg(long, default_value_t = 16, value_parser = non_negative, allow_negative_numbers = true)]
    pub count: u64,
    /// Seed of the first scene; scene i uses seed start + i.
    #[arg(long, default_value_t = 0, value_parser = non_negative, allow_negative_numbers = true)]
    pub start: u64,
    /// Image side in pixels (16 to 4096).
    #[arg(long, default_value_t = 64, value_parser = at_least_one, allow_negative_numbers = true)]
    pub size: usize,
    /// Output folder (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// `png`: images/, masks/ and scenes.jsonl; `raw`: images.u8 (`[N, size, size, 3]` bytes),
    /// objects.u8 (`[N, size, size]`: 0 background, k for the caption's k-th object) and captions.txt,
    /// the training format.
    #[arg(long, default_value = "png", value_parser = ["png", "raw"])]
    pub format: String,
}

/// Write the scenes.
pub fn run(args: &ScenesArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.size >= 16,
        "--size {} is too small (at least 16 px)",
        args.size
    );
    anyhow::ensure!(
        args.size <= MAX_SCENE_SIZE_PX,
        "--size {} is too large (at most {MAX_SCENE_SIZE_PX} px)",
        args.size
    );
    anyhow::ensure!(
        args.start.checked_add(args.count).is_some(),
        "--start {} + --count {} is beyond the last seed {}",
        args.start,
        args.count,
        u64::MAX
    );
    let mut out_dir = OutDir::check("--out", &args.out)?;
    let options = SceneOptions {
        size_px: args.size,
        ..SceneOptions::default()
    };
    if args.format == "raw" {
        let image_bytes = usize::try_from(args.count)
            .ok()
            .and_then(|count| count.checked_mul(args.size * args.size * 3))
            .filter(|&bytes| bytes <= MAX_RAW_BYTES)
            .with_context(|| {
                format!(
                    "--count {} scenes of {size}x{size} px are more than {} GiB of raw images; \
                     write fewer scenes per call",
                    args.count,
                    MAX_RAW_BYTES >> 30,
                    size = args.size
                )
            })?;
        let out = out_dir.create()?.to_path_buf();
        let mut images = Vec::with_capacity(image_bytes);
        let mut object_ids = Vec::with_capacity(images.capacity() / 3);
        let mut captions = String::new();
        for index in 0..args.count {
            let scene = generate_scene(args.start + index, &options);
            images.extend_from_slice(&scene.rgb);
            object_ids.extend(scene_object_ids(&scene));
            captions.push_str(&scene.caption);
            captions.push('\n');
        }
        write_atomically(&out.join("images.u8"), |file| file.write_all(&images))?;
        write_atomically(&out.join("captions.txt"), |file| {
            file.write_all(captions.as_bytes())
        })?;
        write_atomically(&out.join("objects.u8"), |file| file.write_all(&object_ids))?;
        out_dir.keep();
        return Ok(());
    }
    let out = out_dir.create()?.to_path_buf();
    let images_dir = out.join("images");
    let masks_dir = out.join("masks");
    for dir in [&images_dir, &masks_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut index_lines = String::new();
    for index in 0..args.count {
        let seed = args.start + index;
        let scene = generate_scene(seed, &options);
        let name = format!("{seed:07}");
        write_png_rgb(
            &images_dir.join(format!("{name}.png")),
            args.size,
            args.size,
            &scene.rgb,
            Some(&scene.caption),
        )?;
        let mut mask_files = Vec::new();
        for (object_index, (object, mask)) in scene.objects.iter().zip(&scene.masks).enumerate() {
            let file = format!(
                "{name}_{object_index}_{}_{}.png",
                object.colour, object.shape
            );
            let rgb: Vec<u8> = mask
                .iter()
                .flat_map(|&on| if on { [255; 3] } else { [0; 3] })
                .collect();
            write_png_rgb(&masks_dir.join(&file), args.size, args.size, &rgb, None)?;
            mask_files.push(file);
        }
        let line = serde_json::json!({
            "seed": seed,
            "image": format!("images/{name}.png"),
            "caption": scene.caption,
            "background": scene.background,
            "objects": scene.objects,
            "masks": mask_files,
        });
        index_lines.push_str(&line.to_string());
        index_lines.push('\n');
    }
    write_atomically(&out.join("scenes.jsonl"), |file| {
        file.write_all(index_lines.as_bytes())
    })?;
    println!("wrote {} scenes to {}", args.count, out.display());
    out_dir.keep();
    Ok(())
}

/// Per pixel, 0 for the background or `k` (1-based) for the caption's k-th object that is visible there.
fn scene_object_ids(scene: &attend::scenes::Scene) -> Vec<u8> {
    let mut ids = vec![0u8; scene.size_px * scene.size_px];
    for (object_index, mask) in scene.masks.iter().enumerate() {
        for (id, &inside) in ids.iter_mut().zip(mask) {
            if inside {
                *id = u8::try_from(object_index + 1).unwrap_or(u8::MAX);
            }
        }
    }
    ids
}

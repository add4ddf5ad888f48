//! `attend scenes`: write drawn scenes from the deterministic generator.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use attend::analysis::export::{write_atomically, write_png_rgb};
use attend::scenes::{generate_scene, SceneOptions};

/// Arguments of `attend scenes`.
#[derive(Debug, clap::Args)]
pub struct ScenesArgs {
    /// Number of scenes.
    #[arg(long, default_value_t = 16)]
    pub count: u64,
    /// Seed of the first scene; scene i uses seed start + i.
    #[arg(long, default_value_t = 0)]
    pub start: u64,
    /// Image side in pixels.
    #[arg(long, default_value_t = 64)]
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
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let options = SceneOptions {
        size_px: args.size,
        ..SceneOptions::default()
    };
    if args.format == "raw" {
        let mut images =
            Vec::with_capacity(usize::try_from(args.count)? * args.size * args.size * 3);
        let mut object_ids = Vec::with_capacity(images.capacity() / 3);
        let mut captions = String::new();
        for index in 0..args.count {
            let scene = generate_scene(args.start + index, &options);
            images.extend_from_slice(&scene.rgb);
            object_ids.extend(scene_object_ids(&scene));
            captions.push_str(&scene.caption);
            captions.push('\n');
        }
        write_atomically(&args.out.join("images.u8"), |file| file.write_all(&images))?;
        write_atomically(&args.out.join("captions.txt"), |file| {
            file.write_all(captions.as_bytes())
        })?;
        write_atomically(&args.out.join("objects.u8"), |file| {
            file.write_all(&object_ids)
        })?;
        return Ok(());
    }
    let images_dir = args.out.join("images");
    let masks_dir = args.out.join("masks");
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
    write_atomically(&args.out.join("scenes.jsonl"), |file| {
        file.write_all(index_lines.as_bytes())
    })?;
    println!("wrote {} scenes to {}", args.count, args.out.display());
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

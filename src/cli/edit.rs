//! `attend edit`: Prompt-to-Prompt. Generates the source prompt's image and the edited prompt's image
//! from the same noise, the edited one taking its attention from the source (word swap, refine,
//! reweight, local blend).

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use attend::analysis::alignment::EditKind;
use attend::analysis::edit_spec::{
    changes_words, BlendMask, CrossWindow, EditDefaults, EditSpec, LocalBlendConfig, Reweight,
    SelfReplace, StepWindow,
};
use attend::analysis::export::{
    a1111_parameters, write_atomically, write_attention_safetensors, write_png_rgb,
};
use attend::analysis::heatmap::resize_nearest;
use attend::attention::edit_sampling::{
    generate_edit, generate_edited_branch, EditBranch, EditObservers, EditOutput, EditRequest,
    EditStepReport,
};
use attend::attention::p2p::{swapped_blend_words, RecordConfig, INVERTED_IMAGE_SWAP};
use attend::attention::store::{AttentionStore, StoreConfig};
use attend::hook::CancelToken;
use attend::pipeline::model::StableDiffusion;

use super::checks::{at_least_one, warn_unknown_words, OutDir};
use super::generate::{daam_heatmaps, generation_parameters};
use super::images::{
    check_replayable, note_replay_settings, obtain_inversion_recording, replay_inversion,
    ImageArgs, InversionSettings,
};
use super::{load_model, ModelArgs, SamplingArgs};

/// Arguments of `attend edit`. Flag names are stable: scripts rely on them.
#[derive(Debug, clap::Args)]
pub struct EditArgs {
    /// The source prompt.
    #[arg(long)]
    pub prompt: String,
    /// The edited prompt: the same words with some swapped (replace), or words added/removed (refine).
    #[arg(long)]
    pub edit_prompt: String,
    /// How the prompts relate: auto (same word count: replace, else refine), replace or refine.
    #[arg(long, default_value = "auto")]
    pub edit_kind: String,
    /// Scale the edited prompt's attention to a word: WORD=SCALE (0 removes, negative inverts). Repeatable.
    #[arg(long, value_name = "WORD=SCALE")]
    pub reweight: Vec<String>,
    /// Cross-attention replacement window: a fraction F (steps 0..F) or START:END.
    #[arg(
        long,
        default_value = "0.8",
        value_name = "F|START:END",
        allow_negative_numbers = true
    )]
    pub cross_replace: String,
    /// Cross-attention window of one word of the edited prompt: WORD=F or WORD=START:END. Repeatable.
    #[arg(long, value_name = "WORD=F|WORD=START:END")]
    pub cross_replace_word: Vec<String>,
    /// Self-attention replacement window: a fraction F or START:END. Default: when the edited prompt
    /// changes words, the model's recommendation (`_attend_edit_defaults` in model_index.json; 0.2
    /// for the bundled model; none on a given image, where local blend holds the rest), else the
    /// reference's 0.4.
    #[arg(long, value_name = "F|START:END", allow_negative_numbers = true)]
    pub self_replace: Option<String>,
    /// Self-attention is replaced only in layers whose query grid side is at most this. Default: when
    /// the edited prompt changes words, the model's recommendation (32 for the bundled model), else
    /// the reference's 16.
    #[arg(long, value_name = "SIDE", value_parser = at_least_one, allow_negative_numbers = true)]
    pub self_replace_max_side: Option<usize>,
    /// Local blend: only the region of these words may change (WORD[,WORD]; looked up in both prompts;
    /// `square#2` names the second "square" of a prompt alone; `source:WORD` / `edit:WORD` look it up
    /// in one prompt only). Default on a given image: a word swap blends on its swapped words.
    #[arg(long, value_name = "WORD[,WORD]")]
    pub local_blend: Option<String>,
    /// Local blend: words whose region must not change (WORD[,WORD]).
    #[arg(long, value_name = "WORD[,WORD]")]
    pub blend_subtract: Option<String>,
    /// Local blend threshold on the max-normalised word map.
    #[arg(long, default_value_t = 0.3, allow_hyphen_values = true)]
    pub blend_threshold: f32,
    /// Local blend starts after this fraction of the steps.
    #[arg(long, default_value_t = 0.2, allow_hyphen_values = true)]
    pub blend_start: f64,
    /// Side of the cross-attention grid the blend mask is built from (default: a quarter of the
    /// latent side; at most the latent side).
    #[arg(long, value_parser = at_least_one, allow_negative_numbers = true)]
    pub blend_map_side: Option<usize>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Seed, steps, guidance, scheduler, size, negative prompt and initial noise, shared by both runs.
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Edit a given image: `--prompt` describes it, `source.png` is its reconstruction.
    #[command(flatten)]
    pub image: ImageArgs,
    /// Run the source first and replay its recorded attention into an edited-only run (what the
    /// editor does), instead of running both prompts in one batch.
    #[arg(long)]
    pub replay: bool,
    /// Also write `source_attention.safetensors` and `edited_attention.safetensors` (the layout of
    /// `attend generate --attention-out`).
    #[arg(long)]
    pub attention_out: bool,
    /// Folder for `source.png`, `edited.png`, `blend_mask.png` (with local blend), `alignment.json`.
    #[arg(long)]
    pub out_dir: PathBuf,
    /// Print nothing but errors.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Run `attend edit`.
pub fn run(args: &EditArgs) -> anyhow::Result<()> {
    // Checked before the model loads, so a typo is reported at once.
    edit_spec(args, EditDefaults::default())?;
    args.sampling.check()?;
    let image_input = args.image.read(&args.prompt)?;
    let mut out_dir = OutDir::check("--out-dir", &args.out_dir)?;
    out_dir.check_files(&[
        "source.png",
        "edited.png",
        "blend_mask.png",
        "alignment.json",
        "source_attention.safetensors",
        "edited_attention.safetensors",
    ])?;
    let model = load_model(&args.model)?;
    warn_unknown_words(&model, "--prompt", &args.prompt)?;
    warn_unknown_words(&model, "--edit-prompt", &args.edit_prompt)?;
    let mut spec = edit_spec(args, model.edit_defaults())?;
    if image_input.is_some() {
        inverted_image_defaults(args, &model, &mut spec)?;
    }
    let mut request = args.sampling.request(&model, &args.prompt)?;
    if let Some(side) = args.blend_map_side {
        let factor = model.latent_downscale_factor().max(1);
        let latent_side = (request.width / factor).max(request.height / factor);
        anyhow::ensure!(
            side <= latent_side.max(1),
            "invalid --blend-map-side: {side} is larger than the {latent_side}-cell latent side of a \
             {}x{} image (accepted: 1 to {latent_side})",
            request.width,
            request.height
        );
    }
    // A given image inverted now with an exact method: the inversion's guided pass is the source
    // branch, recorded as it runs, and only the edited branch is left to run. With
    // `--attention-out` the source's attention is watched by a separate source run instead.
    let mut recorded_source = None;
    if let Some(input) = &image_input {
        let record = (!args.attention_out).then_some((
            &request,
            RecordConfig {
                self_max_queries: spec.self_replace.max_queries,
                batch_item: 0,
            },
        ));
        check_replayable(&request)?;
        let settings = InversionSettings::from_request(&request);
        let (prepared, inverted) =
            obtain_inversion_recording(&model, input, &settings, record, args.quiet)?;
        note_replay_settings(&prepared, request.steps, request.guidance, args.quiet);
        replay_inversion(&mut request, &prepared.inversion)?;
        recorded_source = inverted;
    }
    let edit_request = EditRequest {
        generate: request,
        spec,
        replay: args.replay,
    };

    let store_for = |prompt: &str| -> anyhow::Result<AttentionStore> {
        Ok(AttentionStore::new(StoreConfig {
            keep_self: false,
            ..StoreConfig::new(model.tokenizer.encode_prompt(prompt)?.token_count())
        }))
    };
    let mut source_store = store_for(&args.prompt)?;
    let mut edited_store = store_for(&args.edit_prompt)?;
    let observers = if args.attention_out {
        EditObservers {
            source: Some(&mut source_store),
            edited: Some(&mut edited_store),
        }
    } else {
        EditObservers::default()
    };
    let started = Instant::now();
    let quiet = args.quiet;
    let mut on_step = |report: &EditStepReport| {
        if !quiet {
            let branch = match report.branch {
                EditBranch::Both => "source + edit",
                EditBranch::Source => "source",
                EditBranch::Edited => "edit",
            };
            eprint!(
                "\r{branch}: step {}/{}  {:.1} s   ",
                report.step_index + 1,
                report.step_count,
                started.elapsed().as_secs_f64()
            );
        }
        Ok(())
    };
    let cancel = CancelToken::new();
    let output = match recorded_source {
        Some(inverted) => {
            let branch = generate_edited_branch(
                &model,
                &edit_request.generate,
                &edit_request.spec,
                Arc::clone(&inverted.recording),
                observers.edited,
                &mut on_step,
                &cancel,
            )?;
            EditOutput {
                source: inverted.source,
                edited: branch.edited,
                alignment: branch.alignment,
                blend_masks: branch.blend_masks,
                recording: Some(inverted.recording),
            }
        }
        None => generate_edit(&model, &edit_request, observers, &mut on_step, &cancel)?,
    };
    if !quiet {
        eprintln!(
            "\rdone in {:.1} s{}",
            started.elapsed().as_secs_f64(),
            " ".repeat(30)
        );
        for pair in &output.alignment.words {
            eprintln!(
                "  {:>12}  {:<8} {}",
                pair.source_text,
                format!("{:?}", pair.change).to_lowercase(),
                pair.edit_text
            );
        }
    }
    let mut warnings = output.source.warnings.clone();
    warnings.dedup();
    for warning in &warnings {
        eprintln!("warning: {warning}");
    }
    let out = out_dir.create()?.to_path_buf();
    write_outputs(args, &model, &edit_request, &output)?;
    if args.attention_out {
        for (store, run, name) in [
            (
                &mut source_store,
                &output.source,
                "source_attention.safetensors",
            ),
            (
                &mut edited_store,
                &output.edited,
                "edited_attention.safetensors",
            ),
        ] {
            store.finish_step()?;
            let words = &run.prompt_tokens.words;
            let heatmaps = daam_heatmaps(store, words, run.image.height, run.image.width);
            write_attention_safetensors(
                &out.join(name),
                &store.cross_by_resolution(),
                &heatmaps,
                words,
                &run.prompt_tokens.tokens,
            )?;
        }
    }
    out_dir.keep();
    Ok(())
}

/// Writes `source.png`, `edited.png`, `blend_mask.png` (with local blend) and `alignment.json`.
fn write_outputs(
    args: &EditArgs,
    model: &StableDiffusion,
    request: &EditRequest,
    output: &EditOutput,
) -> anyhow::Result<()> {
    let source_parameters = generation_parameters(model, &request.generate, &output.source);
    let mut edited_request = request.generate.clone();
    edited_request.prompt.clone_from(&request.spec.edit_prompt);
    let mut edited_parameters = generation_parameters(model, &edited_request, &output.edited);
    edited_parameters.extra.push((
        "Prompt-to-Prompt".to_string(),
        serde_json::to_string(&request.spec)?,
    ));
    edited_parameters.extra.push((
        "P2P source prompt".to_string(),
        request.generate.prompt.clone(),
    ));
    for (run, parameters, name) in [
        (&output.source, source_parameters, "source.png"),
        (&output.edited, edited_parameters, "edited.png"),
    ] {
        let image = &run.image;
        write_png_rgb(
            &args.out_dir.join(name),
            image.width,
            image.height,
            &image.pixels,
            Some(&a1111_parameters(&parameters)),
        )?;
    }
    if let Some(mask) = output.blend_masks.iter().rev().flatten().next() {
        let (width, height) = (output.edited.image.width, output.edited.image.height);
        let resized = resize_nearest(&mask.data, mask.h, mask.w, height, width);
        let rgb: Vec<u8> = resized
            .iter()
            .flat_map(|&value| {
                let grey = if value > 0.5 { 255 } else { 0 };
                [grey; 3]
            })
            .collect();
        write_png_rgb(
            &args.out_dir.join("blend_mask.png"),
            width,
            height,
            &rgb,
            Some("local blend mask of the last step (white: may change)"),
        )?;
    }
    let alignment = serde_json::json!({
        "source_prompt": request.generate.prompt,
        "edit": request.spec,
        "kind": output.alignment.kind,
        "words": output.alignment.words,
        "blend_mask_coverage": output
            .blend_masks
            .iter()
            .map(|mask| mask.as_ref().map(BlendMask::coverage))
            .collect::<Vec<_>>(),
    });
    let text = serde_json::to_string_pretty(&alignment)?;
    write_atomically(&args.out_dir.join("alignment.json"), |file| {
        file.write_all(text.as_bytes())
    })?;
    Ok(())
}

/// `--self-replace` and `--self-replace-max-side`, each falling back to `recommended` (the model's
/// recommendation for the edit, [`SelfReplace::for_edit`]).
pub(super) fn self_replace_from_args(
    window: Option<&str>,
    max_side: Option<usize>,
    recommended: SelfReplace,
) -> anyhow::Result<SelfReplace> {
    let window = match window {
        Some(text) => parse_window(text).context("--self-replace")?,
        None => recommended.window,
    };
    let max_queries = match max_side {
        Some(0) => anyhow::bail!("--self-replace-max-side 0: a grid side is at least 1"),
        Some(side) => side
            .checked_mul(side)
            .with_context(|| format!("--self-replace-max-side {side} is too large"))?,
        None => recommended.max_queries,
    };
    Ok(SelfReplace {
        window,
        max_queries,
    })
}

/// The [`EditSpec`] the arguments describe, with `defaults` (the model's recommendation) where a
/// self-attention flag is left out.
pub fn edit_spec(args: &EditArgs, defaults: EditDefaults) -> anyhow::Result<EditSpec> {
    let kind = match args.edit_kind.trim().to_ascii_lowercase().as_str() {
        "auto" => None,
        "replace" | "swap" => Some(EditKind::Replace),
        "refine" => Some(EditKind::Refine),
        other => anyhow::bail!("--edit-kind {other:?}: expected auto, replace or refine"),
    };
    let cross_default = parse_window(&args.cross_replace).context("--cross-replace")?;
    let per_word = args
        .cross_replace_word
        .iter()
        .map(|text| {
            let (word, window) = split_word_value(text).context("--cross-replace-word")?;
            let window =
                parse_window(window).with_context(|| format!("--cross-replace-word {text:?}"))?;
            Ok((word.to_string(), window))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let reweights = args
        .reweight
        .iter()
        .map(|text| {
            let (word, scale) = split_word_value(text).context("--reweight")?;
            let scale: f32 = scale
                .trim()
                .parse()
                .with_context(|| format!("--reweight {text:?}: {scale:?} is not a number"))?;
            anyhow::ensure!(
                scale.is_finite() && scale.abs() <= MAX_REWEIGHT_SCALE,
                "--reweight {text:?}: scale {scale} is outside the accepted range \
                 -{MAX_REWEIGHT_SCALE} to {MAX_REWEIGHT_SCALE} (1 keeps the word, 0 removes it)"
            );
            Ok(Reweight {
                word: word.to_string(),
                scale,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let self_replace = self_replace_from_args(
        args.self_replace.as_deref(),
        args.self_replace_max_side,
        SelfReplace::for_edit(
            SelfReplace::recommended(defaults),
            &args.prompt,
            &args.edit_prompt,
        ),
    )?;
    // Checked with or without --local-blend, so a typo is never ignored.
    check_blend_threshold(args.blend_threshold)?;
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.blend_start),
        "--blend-start {} is outside 0..1",
        args.blend_start
    );
    let local_blend = match &args.local_blend {
        Some(words) => Some(LocalBlendConfig {
            words: split_words(words),
            subtract_words: args
                .blend_subtract
                .as_deref()
                .map(split_words)
                .unwrap_or_default(),
            threshold: args.blend_threshold,
            subtract_threshold: args.blend_threshold,
            start_fraction: args.blend_start,
            map_side: args.blend_map_side,
            mask: None,
        }),
        None => {
            anyhow::ensure!(
                args.blend_subtract.is_none(),
                "--blend-subtract needs --local-blend"
            );
            None
        }
    };
    if let Some(blend) = &local_blend {
        anyhow::ensure!(!blend.words.is_empty(), "--local-blend names no word");
    }
    Ok(EditSpec {
        edit_prompt: args.edit_prompt.clone(),
        kind,
        cross_window: CrossWindow {
            default: cross_default,
            per_word,
        },
        self_replace,
        reweights,
        local_blend,
    })
}

/// A word swap on a given image starts from [`INVERTED_IMAGE_SWAP`] where its flags are left out:
/// the self-attention window it names, local blend on the swapped words (each named in its own
/// prompt, [`swapped_blend_words`]) with the `--blend-*` settings, and the swapped words' weight
/// (unless `--reweight` is given). Other edits (a refinement,
/// a reweight of the same prompt) are left as the flags say.
fn inverted_image_defaults(
    args: &EditArgs,
    model: &StableDiffusion,
    spec: &mut EditSpec,
) -> anyhow::Result<()> {
    if !changes_words(&args.prompt, &args.edit_prompt) {
        return Ok(());
    }
    if args.self_replace.is_none() {
        spec.self_replace.window = INVERTED_IMAGE_SWAP.self_replace(spec.self_replace).window;
    }
    let source = model.tokenizer.encode_prompt(&args.prompt)?;
    let edit = model.tokenizer.encode_prompt(&args.edit_prompt)?;
    let words = swapped_blend_words(&source.words, &edit.words);
    if args.reweight.is_empty() {
        spec.reweights = swapped_word_reweights(&words, INVERTED_IMAGE_SWAP.swapped_word_weight);
    }
    if args.local_blend.is_none() && INVERTED_IMAGE_SWAP.local_blend && !words.is_empty() {
        spec.local_blend = Some(LocalBlendConfig {
            words,
            threshold: args.blend_threshold,
            subtract_threshold: args.blend_threshold,
            start_fraction: args.blend_start,
            map_side: args.blend_map_side,
            ..LocalBlendConfig::default()
        });
    }
    Ok(())
}

/// The edited prompt's swapped words (the `edit:` selectors of [`swapped_blend_words`]) at
/// `weight`; none at weight 1.
fn swapped_word_reweights(blend_words: &[String], weight: f32) -> Vec<Reweight> {
    if (weight - 1.0).abs() <= f32::EPSILON {
        return Vec::new();
    }
    blend_words
        .iter()
        .filter_map(|word| word.strip_prefix("edit:"))
        .map(|word| Reweight {
            word: word.to_string(),
            scale: weight,
        })
        .collect()
}

/// Largest `--reweight` scale magnitude: P2P's examples use -5..5; far larger scales saturate the
/// softmax and give the same image as any other large value.
pub const MAX_REWEIGHT_SCALE: f32 = 100.0;

/// `--blend-threshold` must be a fraction in `0..=1`.
pub(super) fn check_blend_threshold(threshold: f32) -> anyhow::Result<()> {
    anyhow::ensure!(
        threshold.is_finite() && (0.0..=1.0).contains(&threshold),
        "--blend-threshold {threshold} is outside 0..1"
    );
    Ok(())
}

/// `F` -> `0..F`; `START:END` -> `START..END`; fractions in `0..=1`.
pub(super) fn parse_window(text: &str) -> anyhow::Result<StepWindow> {
    let fraction = |part: &str| -> anyhow::Result<f64> {
        let value: f64 = part
            .trim()
            .parse()
            .with_context(|| format!("{part:?} is not a number"))?;
        anyhow::ensure!(
            (0.0..=1.0).contains(&value),
            "{value} is outside 0..1 (a fraction of the steps)"
        );
        Ok(value)
    };
    match text.split_once(':') {
        Some((start, end)) => {
            let (start, end) = (fraction(start)?, fraction(end)?);
            anyhow::ensure!(start <= end, "window {text:?} ends before it starts");
            Ok(StepWindow::new(start, end))
        }
        None => Ok(StepWindow::until(fraction(text)?)),
    }
}

/// `WORD=VALUE` -> (`WORD`, `VALUE`), both non-empty.
fn split_word_value(text: &str) -> anyhow::Result<(&str, &str)> {
    let (word, value) = text
        .rsplit_once('=')
        .with_context(|| format!("{text:?} is not WORD=VALUE"))?;
    let word = word.trim();
    anyhow::ensure!(
        !word.is_empty() && !value.trim().is_empty(),
        "{text:?} is not WORD=VALUE"
    );
    Ok((word, value))
}

/// `"cat, dog"` -> `["cat", "dog"]`.
fn split_words(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|word| !word.is_empty())
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    fn parse(extra: &[&str]) -> anyhow::Result<EditSpec> {
        parse_for_model(extra, EditDefaults::default())
    }

    fn parse_for_model(extra: &[&str], defaults: EditDefaults) -> anyhow::Result<EditSpec> {
        let mut argv = vec![
            "attend",
            "edit",
            "--prompt",
            "a red circle",
            "--edit-prompt",
            "a red square",
            "--out-dir",
            "out",
        ];
        argv.extend_from_slice(extra);
        let cli = super::super::Cli::try_parse_from(argv)?;
        match cli.command {
            Some(super::super::Command::Edit(args)) => edit_spec(&args, defaults),
            _ => anyhow::bail!("not an edit command"),
        }
    }

    #[test]
    fn defaults_follow_the_reference() {
        let spec = parse(&[]).unwrap();
        assert_eq!(spec, EditSpec::new("a red square"));
        assert_eq!(spec.cross_window.default, StepWindow::until(0.8));
        assert_eq!(spec.self_replace.window, StepWindow::until(0.4));
        assert_eq!(spec.self_replace.max_queries, 256);
    }

    #[test]
    fn self_flags_left_out_take_the_model_recommendation() {
        let bundled_like = EditDefaults {
            self_replace_end: Some(0.2),
            self_replace_max_side: Some(32),
        };
        let spec = parse_for_model(&[], bundled_like).unwrap();
        assert_eq!(spec.self_replace.window, StepWindow::until(0.2));
        assert_eq!(spec.self_replace.max_queries, 32 * 32);
        let spec = parse_for_model(&["--self-replace-max-side", "16"], bundled_like).unwrap();
        assert_eq!(spec.self_replace.window, StepWindow::until(0.2));
        assert_eq!(spec.self_replace.max_queries, 256);
        let spec = parse_for_model(&["--self-replace", "0.4"], bundled_like).unwrap();
        assert_eq!(spec.self_replace.window, StepWindow::until(0.4));
        assert_eq!(spec.self_replace.max_queries, 32 * 32);
        // The test's prompt pair swaps a word; a reweight of the source prompt keeps the reference.
        let cli = super::super::Cli::try_parse_from([
            "attend",
            "edit",
            "--prompt",
            "a red circle",
            "--edit-prompt",
            "A red circle",
            "--reweight",
            "circle=0",
            "--out-dir",
            "out",
        ])
        .unwrap();
        let Some(super::super::Command::Edit(args)) = cli.command else {
            panic!("not an edit command");
        };
        let spec = edit_spec(&args, bundled_like).unwrap();
        assert_eq!(spec.self_replace, SelfReplace::default());
        for side in ["0", "-4"] {
            let err =
                parse_for_model(&["--self-replace-max-side", side], bundled_like).unwrap_err();
            let message = format!("{err:#}");
            assert!(
                message.contains("--self-replace-max-side") && message.contains("at least 1"),
                "{message}"
            );
        }
    }

    #[test]
    fn windows_reweights_and_blend_parse() {
        let spec = parse(&[
            "--cross-replace",
            "0.1:0.9",
            "--cross-replace-word",
            "square=0.5",
            "--cross-replace-word",
            "red=0.2:0.6",
            "--self-replace",
            "0.3",
            "--reweight",
            "red=-1.5",
            "--reweight",
            "square=0",
            "--local-blend",
            "circle, square",
            "--blend-subtract",
            "red",
            "--blend-threshold",
            "0.4",
            "--edit-kind",
            "refine",
        ])
        .unwrap();
        assert_eq!(spec.kind, Some(EditKind::Refine));
        assert_eq!(spec.cross_window.default, StepWindow::new(0.1, 0.9));
        assert_eq!(
            spec.cross_window.per_word,
            vec![
                ("square".to_string(), StepWindow::until(0.5)),
                ("red".to_string(), StepWindow::new(0.2, 0.6)),
            ]
        );
        assert_eq!(spec.self_replace.window, StepWindow::until(0.3));
        assert_eq!(spec.reweights[0].scale, -1.5);
        assert_eq!(spec.reweights[1].word, "square");
        let blend = spec.local_blend.unwrap();
        assert_eq!(blend.words, vec!["circle", "square"]);
        assert_eq!(blend.subtract_words, vec!["red"]);
        assert_eq!(blend.threshold, 0.4);
        assert_eq!(blend.start_fraction, 0.2);
    }

    #[test]
    fn bad_values_are_reported_with_their_flag() {
        for (extra, flag) in [
            (vec!["--cross-replace", "1.5"], "--cross-replace"),
            (vec!["--cross-replace", "0.8:0.2"], "--cross-replace"),
            (vec!["--reweight", "red"], "--reweight"),
            (vec!["--reweight", "red=lots"], "--reweight"),
            (vec!["--cross-replace-word", "=0.3"], "--cross-replace-word"),
            (vec!["--edit-kind", "swapish"], "--edit-kind"),
            (vec!["--blend-subtract", "red"], "--blend-subtract"),
            (vec!["--reweight", "red=1e30"], "--reweight"),
            (vec!["--reweight", "red=-101"], "--reweight"),
            (vec!["--blend-threshold", "NaN"], "--blend-threshold"),
            (vec!["--blend-start", "1.5"], "--blend-start"),
        ] {
            let error = parse(&extra).unwrap_err();
            assert!(format!("{error:#}").contains(flag), "{extra:?}: {error:#}");
        }
    }
}

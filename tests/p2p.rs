//! Prompt-to-Prompt: alignment on the real CLIP tokenizer, and (end to end on the tiny SD 1.x
//! fixture) that identical prompts reproduce the source and that local blend keeps the source's
//! latents outside the mask.

// Test helpers may unwrap like the tests themselves.
#![allow(clippy::unwrap_used)]

mod common;
use common::{fixture, max_abs_diff};

use attend::analysis::alignment::{align_prompts, EditKind, PromptLayout, WordChange};
use attend::analysis::edit_spec::{
    CrossWindow, EditSpec, LocalBlendConfig, SelfReplace, StepWindow,
};
use attend::attention::edit_sampling::{generate_edit, EditObservers, EditOutput, EditRequest};
use attend::hook::CancelToken;
use attend::pipeline::model::{LoadOptions, StableDiffusion};
use attend::pipeline::sampling::{generate, GenerateRequest};
use attend::pipeline::tokenizer::{PromptTokenizer, PromptTokens};

fn layout(tokens: &PromptTokens) -> PromptLayout<'_> {
    PromptLayout {
        tokens: &tokens.tokens,
        words: &tokens.words,
    }
}

#[test]
fn clip_word_swap_spreads_a_split_word() {
    let tokenizer = PromptTokenizer::from_folder(&fixture("tiny-sd1/tokenizer")).unwrap();
    let source = tokenizer.encode("a cat eating a cake").unwrap();
    let edit = tokenizer.encode("a cat eating a tiramisu").unwrap();
    let tiramisu = &edit.words[4];
    assert_eq!(tiramisu.text, "tiramisu");
    let pieces = tiramisu.token_indices.len();
    assert!(pieces > 1, "tiramisu is one CLIP token: {:?}", edit.tokens);
    let alignment = align_prompts(&layout(&source), &layout(&edit), 77, None).unwrap();
    assert_eq!(alignment.kind, EditKind::Replace);
    let cake = source.words[4].token_indices[0];
    for &token in &tiramisu.token_indices {
        assert_eq!(
            alignment.mapping.sources_of(token),
            vec![(cake, 1.0 / pieces as f32)]
        );
    }
    // The end token follows the longer word: source end -> edited end.
    let source_end = source.token_count() - 1;
    let edit_end = edit.token_count() - 1;
    assert_eq!(
        alignment.mapping.sources_of(edit_end),
        vec![(source_end, 1.0)]
    );
    assert_eq!(alignment.words[4].change, WordChange::Swapped);
}

#[test]
fn clip_refine_aligns_added_words() {
    let tokenizer = PromptTokenizer::from_folder(&fixture("tiny-sd1/tokenizer")).unwrap();
    let source = tokenizer.encode("a cat eating a cake").unwrap();
    let edit = tokenizer
        .encode("a fluffy cat eating a chocolate cake.")
        .unwrap();
    let alignment = align_prompts(&layout(&source), &layout(&edit), 77, None).unwrap();
    assert_eq!(alignment.kind, EditKind::Refine);
    let added: Vec<&str> = alignment
        .words
        .iter()
        .filter(|pair| pair.change == WordChange::Added)
        .map(|pair| pair.edit_text.as_str())
        .collect();
    assert_eq!(added, vec!["fluffy", "chocolate"]);
    let fluffy = edit.words[1].token_indices[0];
    assert_eq!(alignment.mapping.alphas[fluffy], 0.0);
    // "cake" in the edit takes the source's "cake".
    let edit_cake = edit.words[6].token_indices[0];
    let source_cake = source.words[4].token_indices[0];
    assert_eq!(
        alignment.mapping.sources_of(edit_cake),
        vec![(source_cake, 1.0)]
    );
    // The full stop is new too (not a word, but a token the source lacks).
    let full_stop = edit.token_count() - 2;
    assert_eq!(alignment.mapping.alphas[full_stop], 0.0);
}

const PROMPT: &str = "a photo of a cat wearing sunglasses";
const STEPS: usize = 8;

fn tiny_sd1() -> StableDiffusion {
    StableDiffusion::load(&fixture("tiny-sd1"), &LoadOptions::default()).unwrap()
}

fn run_edit(model: &StableDiffusion, spec: EditSpec, replay: bool) -> EditOutput {
    let mut generate_request = GenerateRequest::new(model, PROMPT);
    generate_request.seed = 7;
    generate_request.steps = STEPS;
    let request = EditRequest {
        generate: generate_request,
        spec,
        replay,
    };
    generate_edit(
        model,
        &request,
        EditObservers::default(),
        &mut |_| Ok(()),
        &CancelToken::new(),
    )
    .unwrap()
}

fn full_windows(edit_prompt: &str) -> EditSpec {
    EditSpec {
        cross_window: CrossWindow::uniform(StepWindow::until(1.0)),
        self_replace: SelfReplace {
            window: StepWindow::until(1.0),
            ..SelfReplace::default()
        },
        ..EditSpec::new(edit_prompt)
    }
}

#[test]
fn identical_prompts_with_full_windows_reproduce_the_source() {
    let model = tiny_sd1();
    let mut plain_request = GenerateRequest::new(&model, PROMPT);
    plain_request.seed = 7;
    plain_request.steps = STEPS;
    let plain = generate(
        &model,
        &plain_request,
        None,
        &mut |_| Ok(()),
        &CancelToken::new(),
    )
    .unwrap();
    for replay in [false, true] {
        let output = run_edit(&model, full_windows(PROMPT), replay);
        let image_diff = max_abs_diff(&output.edited.image_f32, &output.source.image_f32);
        let latent_diff = max_abs_diff(
            &output.edited.latents_per_step,
            &output.source.latents_per_step,
        );
        // The source of an edit is the plain run of its prompt.
        let source_vs_plain = max_abs_diff(&output.source.image_f32, &plain.image_f32);
        eprintln!(
            "{} mode, identical prompts, windows 1.0: edited vs source image max abs diff {image_diff:e}, \
             latents {latent_diff:e}; source vs plain generate {source_vs_plain:e}",
            if replay { "replay" } else { "batch" }
        );
        assert!(image_diff <= 1e-4, "{image_diff}");
        assert!(latent_diff <= 1e-4, "{latent_diff}");
        assert!(source_vs_plain <= 1e-4, "{source_vs_plain}");
        assert_eq!(output.edited.image.pixels, output.source.image.pixels);
    }
}

#[test]
fn local_blend_keeps_the_source_outside_the_mask() {
    let model = tiny_sd1();
    let spec = EditSpec {
        // The random tiny model attends broadly: a high threshold on the 16x16 maps keeps the mask
        // partial, so both sides of it are tested.
        local_blend: Some(LocalBlendConfig {
            threshold: 0.8,
            map_side: Some(16),
            ..LocalBlendConfig::new(vec!["cat".into(), "dog".into()])
        }),
        ..EditSpec::new("a photo of a dog wearing sunglasses")
    };
    let blend_start = (0.2 * STEPS as f64).floor() as usize;
    for replay in [false, true] {
        let output = run_edit(&model, spec.clone(), replay);
        let mut masked_steps = 0;
        let mut partial = false;
        for step in 0..STEPS {
            let mask = &output.blend_masks[step];
            if step < blend_start {
                assert!(mask.is_none(), "blend before its start at step {step}");
                continue;
            }
            let mask = mask
                .as_ref()
                .unwrap_or_else(|| panic!("no mask at step {step}"));
            masked_steps += 1;
            partial |= mask.coverage() > 0.0 && mask.coverage() < 1.0;
            let source = output
                .source
                .latents_per_step
                .get(step)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let edited = output
                .edited
                .latents_per_step
                .get(step)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let cells = mask.h * mask.w;
            let mut outside_diff = 0.0f32;
            let mut inside_diff = 0.0f32;
            for (index, (edited, source)) in edited.iter().zip(&source).enumerate() {
                let difference = (edited - source).abs();
                if mask.data[index % cells] == 0.0 {
                    outside_diff = outside_diff.max(difference);
                } else {
                    inside_diff = inside_diff.max(difference);
                }
            }
            eprintln!(
                "{} mode, step {step}: mask covers {:.2}; outside max abs diff to source {outside_diff:e}, inside {inside_diff:e}",
                if replay { "replay" } else { "batch" },
                mask.coverage()
            );
            assert_eq!(outside_diff, 0.0, "step {step}");
        }
        assert_eq!(masked_steps, STEPS - blend_start);
        assert!(
            partial,
            "every mask was empty or full: the test would prove nothing"
        );
    }
}

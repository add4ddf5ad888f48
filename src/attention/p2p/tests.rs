//! Unit tests of the Prompt-to-Prompt processor on synthetic attention.

use super::*;
use crate::analysis::alignment::EditKind;
use crate::analysis::edit_spec::{changes_words, CrossWindow, Reweight};
use crate::analysis::WordSpan;
use crate::hook::ChainedProcessors;
use crate::kernels::test_support::max_abs_diff;
use candle_core::{DType, Device};

/// Encoded length used by these tests (keys of every cross-attention layer).
const LENGTH: usize = 10;
const HEADS: usize = 2;

/// A prompt made of one-token words (`"sun+glasses"` is one word of two tokens).
struct Prompt {
    tokens: Vec<String>,
    words: Vec<WordSpan>,
}

impl Prompt {
    fn new(text: &str) -> Self {
        let mut tokens = vec!["<start>".to_string()];
        let mut words = Vec::new();
        for word in text.split(' ') {
            let first = tokens.len();
            tokens.extend(word.split('+').map(String::from));
            words.push(WordSpan {
                text: word.replace('+', ""),
                token_indices: (first..tokens.len()).collect(),
            });
        }
        tokens.push("<end>".to_string());
        Self { tokens, words }
    }

    fn layout(&self) -> PromptLayout<'_> {
        PromptLayout {
            tokens: &self.tokens,
            words: &self.words,
        }
    }
}

fn processor(source: &str, edit: &str, spec: &EditSpec, mode: SourceMode) -> PromptToPrompt {
    let source = Prompt::new(source);
    let edit = Prompt::new(edit);
    PromptToPrompt::new(spec, &source.layout(), &edit.layout(), LENGTH, mode).unwrap()
}

fn full_windows(edit_prompt: &str) -> EditSpec {
    EditSpec {
        cross_window: CrossWindow::uniform(StepWindow::until(1.0)),
        self_replace: SelfReplace {
            window: StepWindow::until(1.0),
            max_queries: 16 * 16,
        },
        ..EditSpec::new(edit_prompt)
    }
}

fn site(
    kind: AttentionKind,
    side: usize,
    batch: usize,
    step_index: usize,
    step_count: usize,
) -> AttentionSite {
    AttentionSite {
        place: UnetPlace::Up,
        block_index: 1,
        attention_index: 0,
        layer_index: 0,
        kind,
        query_h: side,
        query_w: side,
        heads: HEADS,
        keys: match kind {
            AttentionKind::Cross => LENGTH,
            AttentionKind::SelfAttention => side * side,
        },
        batch,
        cfg: true,
        step_index,
        step_count,
    }
}

/// Deterministic pseudo-random values in (0, 1), different for every `salt`.
fn noise(count: usize, salt: u64) -> Vec<f32> {
    let mut state = salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    (0..count)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 + 0.5) / (1u64 << 24) as f32
        })
        .collect()
}

/// `[heads, queries, keys]` for one batch item.
fn item_probs(site: &AttentionSite, salt: u64) -> Tensor {
    Tensor::from_vec(
        noise(HEADS * site.queries() * site.keys, salt),
        (HEADS, site.queries(), site.keys),
        &Device::Cpu,
    )
    .unwrap()
}

fn stack(items: &[&Tensor]) -> Tensor {
    Tensor::cat(items, 0).unwrap()
}

fn item(probs: &Tensor, index: usize) -> Tensor {
    probs.narrow(0, index * HEADS, HEADS).unwrap()
}

/// Runs the processor on a batch `[uncond_src, uncond_edit, cond_src, cond_edit]` and returns the
/// resulting batch (the input when the processor kept it).
fn run_batch(processor: &mut PromptToPrompt, site: &AttentionSite, salt: u64) -> (Tensor, Tensor) {
    let items: Vec<Tensor> = (0..4)
        .map(|index| item_probs(site, salt * 10 + index))
        .collect();
    let input = stack(&items.iter().collect::<Vec<_>>());
    let output = processor
        .process_probabilities(site, &input)
        .unwrap()
        .unwrap_or_else(|| input.clone());
    assert_eq!(output.dims(), input.dims());
    (input, output)
}

#[test]
fn window_arithmetic_follows_the_reference() {
    // Cross windows index a table of N + 1 rows, self windows N rows.
    assert_eq!(StepWindow::until(0.8).cross_steps(50), 0..40);
    assert_eq!(StepWindow::until(0.4).self_steps(50), 0..20);
    assert_eq!(StepWindow::new(0.2, 0.7).cross_steps(10), 2..7);
    assert_eq!(StepWindow::new(0.2, 0.7).self_steps(10), 2..7);
    // 0.7 * 10 is 7.000000000000001 in f64, as in Python.
    assert_eq!(StepWindow::until(0.7).self_steps(10), 0..7);
    assert_eq!(StepWindow::until(1.0).cross_steps(7), 0..7);
    assert_eq!(StepWindow::until(1.0).self_steps(7), 0..7);
    assert_eq!(StepWindow::until(0.0).cross_steps(7), 0..0);
    assert_eq!(StepWindow::new(0.9, 0.1).self_steps(10), 9..9);
    // Local blend from floor(0.2 * N).
    let blend = LocalBlendConfig::new(vec!["cat".into()]);
    assert!(!blend.is_active(9, 50));
    assert!(blend.is_active(10, 50));
    assert!(!blend.is_active(0, 8));
    assert!(blend.is_active(1, 8));

    // Per-word windows override the default for every occurrence of the word in the edited prompt.
    let spec = EditSpec {
        cross_window: CrossWindow {
            default: StepWindow::until(1.0),
            per_word: vec![("square".into(), StepWindow::until(0.5))],
        },
        ..EditSpec::new("a square and a square")
    };
    let p2p = processor(
        "a circle and a circle",
        "a square and a square",
        &spec,
        SourceMode::Batch,
    );
    // N = 4: the default covers 0..4, "square" floor(0.5 * 5) = 2 steps.
    let expected_open = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
    assert_eq!(p2p.cross_window_weights(1, 4), expected_open);
    let mut expected_late = expected_open;
    expected_late[2] = 0.0;
    expected_late[5] = 0.0;
    assert_eq!(p2p.cross_window_weights(2, 4), expected_late);
    // "square#2" names the second occurrence alone.
    let spec = EditSpec {
        cross_window: CrossWindow {
            default: StepWindow::until(1.0),
            per_word: vec![("square#2".into(), StepWindow::until(0.5))],
        },
        ..EditSpec::new("a square and a square")
    };
    let second_only = processor(
        "a circle and a circle",
        "a square and a square",
        &spec,
        SourceMode::Batch,
    );
    let mut expected_second = expected_open;
    expected_second[5] = 0.0;
    assert_eq!(second_only.cross_window_weights(2, 4), expected_second);
    assert!(p2p.replaces_self_attention(256, 0, 10));
    assert!(!p2p.replaces_self_attention(257, 0, 10));
    assert!(!p2p.replaces_self_attention(64, 4, 10));
    // Probabilities are asked for where they are used: every cross-attention layer, and the
    // self-attention layers inside the self-replace window and size.
    assert!(p2p.wants_probabilities(&site(AttentionKind::Cross, 64, 4, 9, 10)));
    assert!(p2p.wants_probabilities(&site(AttentionKind::SelfAttention, 16, 4, 0, 10)));
    assert!(!p2p.wants_probabilities(&site(AttentionKind::SelfAttention, 17, 4, 0, 10)));
    assert!(!p2p.wants_probabilities(&site(AttentionKind::SelfAttention, 8, 4, 4, 10)));
}

#[test]
fn identical_prompts_with_full_windows_copy_the_source() {
    let spec = full_windows("a red circle");
    let mut p2p = processor("a red circle", "a red circle", &spec, SourceMode::Batch);
    let mut max_diff = 0.0f32;
    let step_count = 5;
    for step in 0..step_count {
        for (kind, side) in [(AttentionKind::Cross, 4), (AttentionKind::SelfAttention, 4)] {
            let site = site(kind, side, 4, step, step_count);
            let (input, output) = run_batch(&mut p2p, &site, step as u64 + 1);
            // The edited conditional item now equals the source's; the others are untouched.
            max_diff = max_diff.max(max_abs_diff(&item(&output, 3), &item(&input, 2)));
            for index in 0..3 {
                assert_eq!(
                    max_abs_diff(&item(&output, index), &item(&input, index)),
                    0.0
                );
            }
        }
    }
    eprintln!(
        "identical prompts, windows 1.0: edited vs source attention max abs diff {max_diff:e}"
    );
    assert_eq!(max_diff, 0.0);

    // Self-attention above max_queries keeps its own attention.
    let large = site(AttentionKind::SelfAttention, 17, 4, 0, step_count);
    let input = stack(
        &(0..4)
            .map(|index| item_probs(&large, index))
            .collect::<Vec<_>>()
            .iter()
            .collect::<Vec<_>>(),
    );
    assert!(p2p.process_probabilities(&large, &input).unwrap().is_none());
}

#[test]
fn reweight_by_one_changes_nothing() {
    let step_count = 6;
    let base = EditSpec {
        cross_window: CrossWindow::uniform(StepWindow::until(0.8)),
        ..EditSpec::new("a black cat")
    };
    let reweighted = EditSpec {
        reweights: vec![Reweight {
            word: "cat".into(),
            scale: 1.0,
        }],
        ..base.clone()
    };
    let mut plain = processor("a cat", "a black cat", &base, SourceMode::Batch);
    let mut with_reweight = processor("a cat", "a black cat", &reweighted, SourceMode::Batch);
    let mut max_diff = 0.0f32;
    for step in 0..step_count {
        let site = site(AttentionKind::Cross, 3, 4, step, step_count);
        let (_, expected) = run_batch(&mut plain, &site, step as u64 + 7);
        let (_, actual) = run_batch(&mut with_reweight, &site, step as u64 + 7);
        max_diff = max_diff.max(max_abs_diff(&expected, &actual));
    }
    eprintln!("reweight 1.0 vs none: max abs diff {max_diff:e}");
    assert_eq!(max_diff, 0.0);
}

#[test]
fn reweight_scales_without_renormalising_and_allows_negatives() {
    let spec = EditSpec {
        reweights: vec![
            Reweight {
                word: "cat".into(),
                scale: -2.0,
            },
            Reweight {
                word: "hat".into(),
                scale: 0.0,
            },
        ],
        ..full_windows("a cat in a hat")
    };
    let mut p2p = processor("a cat in a hat", "a cat in a hat", &spec, SourceMode::Batch);
    let site = site(AttentionKind::Cross, 2, 4, 0, 10);
    let (input, output) = run_batch(&mut p2p, &site, 3);
    let source = item(&input, 2).to_vec3::<f32>().unwrap();
    let edited = item(&output, 3).to_vec3::<f32>().unwrap();
    for head in 0..HEADS {
        for query in 0..4 {
            for token in 0..LENGTH {
                let scale = match token {
                    2 => -2.0,
                    5 => 0.0,
                    _ => 1.0,
                };
                assert_eq!(
                    edited[head][query][token],
                    scale * source[head][query][token]
                );
            }
        }
    }
}

#[test]
fn replace_spreads_a_split_word_and_refine_keeps_new_tokens() {
    // Replace: "hat" (1 token) -> "sun glasses" (2 tokens): each gets half of the source's "hat".
    let spec = full_windows("a cat in sun+glasses");
    let mut p2p = processor(
        "a cat in hat",
        "a cat in sun+glasses",
        &spec,
        SourceMode::Batch,
    );
    assert_eq!(p2p.alignment().kind, EditKind::Replace);
    let site_cross = site(AttentionKind::Cross, 2, 4, 0, 10);
    let (input, output) = run_batch(&mut p2p, &site_cross, 5);
    let source = item(&input, 2).to_vec3::<f32>().unwrap();
    let edited = item(&output, 3).to_vec3::<f32>().unwrap();
    let mut max_diff = 0.0f32;
    for head in 0..HEADS {
        for query in 0..4 {
            let row_source = &source[head][query];
            let row_edited = &edited[head][query];
            let expected = [
                row_source[0],
                row_source[1],
                row_source[2],
                row_source[3],
                row_source[4] / 2.0,
                row_source[4] / 2.0,
                row_source[5],
                row_source[6],
                row_source[7],
                row_source[8],
            ];
            for (actual, expected) in row_edited.iter().zip(expected) {
                max_diff = max_diff.max((actual - expected).abs());
            }
        }
    }
    eprintln!("replace with a split word: max abs diff {max_diff:e}");
    assert!(max_diff < 1e-6);

    // Refine: "a cat" -> "a black cat": "black" keeps the edited prompt's own attention.
    let spec = full_windows("a black cat");
    let mut p2p = processor("a cat", "a black cat", &spec, SourceMode::Batch);
    assert_eq!(p2p.alignment().kind, EditKind::Refine);
    let (input, output) = run_batch(&mut p2p, &site_cross, 6);
    let source = item(&input, 2).to_vec3::<f32>().unwrap();
    let own = item(&input, 3).to_vec3::<f32>().unwrap();
    let edited = item(&output, 3).to_vec3::<f32>().unwrap();
    for head in 0..HEADS {
        for query in 0..4 {
            let (s, o, e) = (
                &source[head][query],
                &own[head][query],
                &edited[head][query],
            );
            assert_eq!(e[0], s[0]);
            assert_eq!(e[1], s[1]);
            assert_eq!(e[2], o[2], "the new word keeps its own attention");
            assert_eq!(e[3], s[2]);
            assert_eq!(e[4], s[3]);
            assert_eq!(e[5], s[4], "padding aligned from the end tokens");
        }
    }
}

#[test]
fn closed_window_keeps_own_attention_per_token() {
    let spec = EditSpec {
        cross_window: CrossWindow {
            default: StepWindow::until(1.0),
            per_word: vec![("square".into(), StepWindow::new(0.5, 1.0))],
        },
        self_replace: SelfReplace {
            window: StepWindow::until(0.0),
            max_queries: 256,
        },
        ..EditSpec::new("a red square")
    };
    let mut p2p = processor("a red circle", "a red square", &spec, SourceMode::Batch);
    // Step 0 of 4: "square" (token 3) is outside its window 2..4.
    let cross = site(AttentionKind::Cross, 2, 4, 0, 4);
    let (input, output) = run_batch(&mut p2p, &cross, 9);
    let source = item(&input, 2).to_vec3::<f32>().unwrap();
    let own = item(&input, 3).to_vec3::<f32>().unwrap();
    let edited = item(&output, 3).to_vec3::<f32>().unwrap();
    for token in 0..LENGTH {
        let expected = if token == 3 {
            own[1][2][token]
        } else {
            source[1][2][token]
        };
        assert_eq!(edited[1][2][token], expected, "token {token}");
    }
    // The self window is empty: self-attention is left alone.
    let self_site = site(AttentionKind::SelfAttention, 2, 4, 0, 4);
    let input = stack(
        &(0..4)
            .map(|index| item_probs(&self_site, index))
            .collect::<Vec<_>>()
            .iter()
            .collect::<Vec<_>>(),
    );
    assert!(p2p
        .process_probabilities(&self_site, &input)
        .unwrap()
        .is_none());
}

#[test]
fn replay_matches_batch_mode() {
    let blend = LocalBlendConfig {
        map_side: Some(2),
        ..LocalBlendConfig::new(vec!["circle".into(), "square".into()])
    };
    let spec = EditSpec {
        reweights: vec![Reweight {
            word: "red".into(),
            scale: 1.5,
        }],
        local_blend: Some(blend),
        ..EditSpec::new("a red square")
    };
    let step_count = 5;
    let mut batch = processor("a red circle", "a red square", &spec, SourceMode::Batch);
    let mut recorder = SourceRecorder::new(RecordConfig::default());
    let kinds = [
        (AttentionKind::Cross, 2),
        (AttentionKind::SelfAttention, 2),
        (AttentionKind::Cross, 4),
        (AttentionKind::SelfAttention, 4),
    ];
    // Source run alone: [uncond_src, cond_src].
    let mut batch_outputs = Vec::new();
    let mut edit_inputs = Vec::new();
    for step in 0..step_count {
        for (layer, &(kind, side)) in kinds.iter().enumerate() {
            let mut site4 = site(kind, side, 4, step, step_count);
            site4.layer_index = layer;
            let salt = (step * 10 + layer) as u64;
            let (input, output) = run_batch(&mut batch, &site4, salt);
            let site2 = AttentionSite {
                batch: 2,
                ..site4.clone()
            };
            let source_run = stack(&[&item(&input, 0), &item(&input, 2)]);
            assert!(recorder
                .process_probabilities(&site2, &source_run)
                .unwrap()
                .is_none());
            edit_inputs.push((site2, stack(&[&item(&input, 1), &item(&input, 3)])));
            batch_outputs.push(output);
        }
    }
    let recording = recorder.finish();
    assert_eq!(recording.step_count(), step_count);
    assert_eq!(recording.layer_step_count(), step_count * kinds.len());
    let mut replay = processor(
        "a red circle",
        "a red square",
        &spec,
        SourceMode::Replay(recording),
    );
    let mut max_diff = 0.0f32;
    for ((site2, input), batch_output) in edit_inputs.iter().zip(&batch_outputs) {
        let output = replay
            .process_probabilities(site2, input)
            .unwrap()
            .unwrap_or_else(|| input.clone());
        max_diff = max_diff.max(max_abs_diff(&item(&output, 1), &item(batch_output, 3)));
        max_diff = max_diff.max(max_abs_diff(&item(&output, 0), &item(batch_output, 1)));
    }
    eprintln!("replay vs batch mode: max abs diff {max_diff:e}");
    assert_eq!(max_diff, 0.0);
    // Both collected the same blend maps.
    assert_eq!(
        batch.blend_word_maps(8, 8).unwrap(),
        replay.blend_word_maps(8, 8).unwrap()
    );

    // A replay without the recording of a layer is an error.
    let mut empty = processor(
        "a red circle",
        "a red square",
        &spec,
        SourceMode::Replay(SourceRecorder::default().finish()),
    );
    let (site2, input) = &edit_inputs[0];
    let error = empty.process_probabilities(site2, input).unwrap_err();
    assert!(
        error.to_string().contains("no recorded source attention"),
        "{error}"
    );
}

#[test]
fn replay_replaces_the_edited_item_without_its_own_probabilities_where_it_can() {
    let step_count = 4;
    let kinds = [(AttentionKind::Cross, 2), (AttentionKind::SelfAttention, 2)];
    // The source run alone, recorded: [uncond_src, cond_src].
    let mut recorder = SourceRecorder::new(RecordConfig::default());
    let mut sites = Vec::new();
    for step in 0..step_count {
        for (layer, &(kind, side)) in kinds.iter().enumerate() {
            let mut site2 = site(kind, side, 2, step, step_count);
            site2.layer_index = layer;
            let salt = (step * 10 + layer) as u64;
            let source_run = stack(&[&item_probs(&site2, salt), &item_probs(&site2, salt + 5)]);
            recorder.process_probabilities(&site2, &source_run).unwrap();
            sites.push(site2);
        }
    }
    let recording = recorder.finish();
    let spec = EditSpec {
        reweights: vec![Reweight {
            word: "red".into(),
            scale: 1.5,
        }],
        ..full_windows("a red square")
    };
    let replay = |spec: &EditSpec| {
        processor(
            "a red circle",
            "a red square",
            spec,
            SourceMode::Replay(recording.clone()),
        )
    };
    // Full windows, no blend: every layer replaces the conditional item (row 1) with exactly
    // what it makes from the materialised probabilities.
    let mut p2p = replay(&spec);
    for (index, site2) in sites.iter().enumerate() {
        assert_eq!(p2p.replaced_item(site2), Some(1), "{site2:?}");
        let own = stack(&[
            &item_probs(site2, 100 + index as u64),
            &item_probs(site2, 200 + index as u64),
        ]);
        let materialised = p2p.process_probabilities(site2, &own).unwrap().unwrap();
        let replacement = p2p.replacement_probabilities(site2).unwrap();
        assert_eq!(max_abs_diff(&replacement, &item(&materialised, 1)), 0.0);
    }
    // Batch mode reads the source from the batch: nothing is replaced ahead.
    let batch = processor("a red circle", "a red square", &spec, SourceMode::Batch);
    assert_eq!(
        batch.replaced_item(&site(AttentionKind::Cross, 2, 4, 0, 4)),
        None
    );
    // A local blend reads the cross-attention maps: those layers need them; self-attention is
    // still replaced.
    let blended = replay(&EditSpec {
        local_blend: Some(LocalBlendConfig::new(vec!["square".into()])),
        ..spec.clone()
    });
    assert_eq!(blended.replaced_item(&sites[0]), None);
    assert_eq!(blended.replaced_item(&sites[1]), Some(1));
    // A window that closes halfway mixes in the item's own attention after it, and needs no
    // probabilities once every window is closed.
    let halfway = replay(&EditSpec {
        cross_window: CrossWindow::uniform(StepWindow::until(0.5)),
        ..spec.clone()
    });
    let first_cross = site(AttentionKind::Cross, 2, 2, 0, step_count);
    let last_cross = site(AttentionKind::Cross, 2, 2, step_count - 1, step_count);
    assert_eq!(halfway.replaced_item(&first_cross), Some(1));
    assert_eq!(halfway.replaced_item(&last_cross), None);
    assert!(halfway.wants_probabilities(&first_cross));
    assert!(!halfway.wants_probabilities(&last_cross));
}

#[test]
fn local_blend_mask_pools_normalises_and_unites() {
    let grid = |cells: &[(usize, f32)]| {
        let mut data = vec![0.0f32; 16];
        for &(index, value) in cells {
            data[index] = value;
        }
        data
    };
    // 4x4 grid -> 8x8 latent. Source: peak at (0, 0) and a weak cell at (3, 3) (below 0.3 of max).
    let source = BlendWordMaps {
        h: 4,
        w: 4,
        words: grid(&[(0, 1.0), (15, 0.2)]),
        subtract_words: vec![0.0; 16],
    };
    // Edit: a peak at (2, 3).
    let edit = BlendWordMaps {
        h: 4,
        w: 4,
        words: grid(&[(11, 0.5)]),
        subtract_words: grid(&[(11, 1.0)]),
    };
    let mask = local_blend_mask(&source, &edit, 8, 8, 0.3, None);
    let expected_grid = |y: usize, x: usize| {
        // Source peak dilated 3x3: grid rows 0..2, cols 0..2. Edit peak: rows 1..4, cols 2..4.
        (y < 2 && x < 2) || ((1..4).contains(&y) && x >= 2)
    };
    for y in 0..8 {
        for x in 0..8 {
            let expected = if expected_grid(y / 2, x / 2) {
                1.0
            } else {
                0.0
            };
            assert_eq!(mask.data[y * 8 + x], expected, "latent ({y}, {x})");
        }
    }
    // Subtract the edit's subtract word (not pooled): only grid cell (2, 3) goes.
    let subtracted = local_blend_mask(&source, &edit, 8, 8, 0.3, Some(0.3));
    for y in 0..8 {
        for x in 0..8 {
            let removed = y / 2 == 2 && x / 2 == 3;
            let expected = if expected_grid(y / 2, x / 2) && !removed {
                1.0
            } else {
                0.0
            };
            assert_eq!(subtracted.data[y * 8 + x], expected, "latent ({y}, {x})");
        }
    }
    // A prompt with an all-zero map adds nothing; both zero: empty mask.
    let zero = BlendWordMaps {
        h: 4,
        w: 4,
        words: vec![0.0; 16],
        subtract_words: vec![0.0; 16],
    };
    assert_eq!(
        local_blend_mask(&zero, &zero, 8, 8, 0.3, None).coverage(),
        0.0
    );
    assert_eq!(
        local_blend_mask(&source, &zero, 8, 8, 0.3, None).coverage(),
        16.0 / 64.0
    );
}

#[test]
fn local_blend_keeps_the_source_outside_the_mask() {
    let spec = EditSpec {
        local_blend: Some(LocalBlendConfig {
            map_side: Some(4),
            ..LocalBlendConfig::new(vec!["circle".into(), "square".into()])
        }),
        ..EditSpec::new("a red square")
    };
    let mut p2p = processor("a red circle", "a red square", &spec, SourceMode::Batch);
    let step_count = 5;
    let latents_source = Tensor::from_vec(noise(4 * 64, 1), (1, 4, 8, 8), &Device::Cpu).unwrap();
    let latents_edit = Tensor::from_vec(noise(4 * 64, 2), (1, 4, 8, 8), &Device::Cpu).unwrap();
    let latents = Tensor::cat(&[&latents_source, &latents_edit], 0).unwrap();
    for step in 0..step_count {
        // The words' attention peaks in the top-left quarter of the 4x4 grid.
        let cross = site(AttentionKind::Cross, 4, 4, step, step_count);
        let mut values = vec![0.01f32; 4 * HEADS * 16 * LENGTH];
        for batch_item in 0..4 {
            for head in 0..HEADS {
                for query in [0usize, 1, 4, 5] {
                    values[((batch_item * HEADS + head) * 16 + query) * LENGTH + 3] = 1.0;
                }
            }
        }
        let input = Tensor::from_vec(values, (4 * HEADS, 16, LENGTH), &Device::Cpu).unwrap();
        p2p.process_probabilities(&cross, &input).unwrap();
        let blended = p2p.blend_batch_latents(step, step_count, &latents).unwrap();
        let source_after = blended.narrow(0, 0, 1).unwrap();
        let edit_after = blended.narrow(0, 1, 1).unwrap();
        assert_eq!(max_abs_diff(&source_after, &latents_source), 0.0);
        if step < 1 {
            assert_eq!(
                max_abs_diff(&edit_after, &latents_edit),
                0.0,
                "before the blend start"
            );
            assert!(p2p.latest_mask().is_none());
            continue;
        }
        let mask = p2p.latest_mask().unwrap().clone();
        // Grid rows/cols 0..2 pooled to 0..3 of 4, i.e. latent 0..6 of 8.
        assert_eq!(mask.coverage(), 36.0 / 64.0);
        let edit_after = edit_after
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let source_values = latents_source
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let edit_values = latents_edit
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut outside_diff = 0.0f32;
        for (index, &value) in edit_after.iter().enumerate() {
            let cell = index % 64;
            if mask.data[cell] == 0.0 {
                outside_diff = outside_diff.max((value - source_values[index]).abs());
            } else {
                assert_eq!(value, edit_values[index]);
            }
        }
        eprintln!("local blend step {step}: outside-mask max abs diff to source {outside_diff:e}");
        assert_eq!(outside_diff, 0.0);
    }
}

#[test]
fn bad_inputs_are_errors() {
    let source = Prompt::new("a cat");
    let edit = Prompt::new("a dog");
    let spec = EditSpec {
        reweights: vec![Reweight {
            word: "cat".into(),
            scale: 2.0,
        }],
        ..EditSpec::new("a dog")
    };
    let error = PromptToPrompt::new(
        &spec,
        &source.layout(),
        &edit.layout(),
        LENGTH,
        SourceMode::Batch,
    )
    .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("not a word of the edited prompt"),
        "{error}"
    );
    let spec = EditSpec {
        kind: Some(EditKind::Replace),
        ..EditSpec::new("a big dog")
    };
    let longer = Prompt::new("a big dog");
    assert!(PromptToPrompt::new(
        &spec,
        &source.layout(),
        &longer.layout(),
        LENGTH,
        SourceMode::Batch
    )
    .is_err());
    let spec = EditSpec {
        local_blend: Some(LocalBlendConfig::new(vec!["horse".into()])),
        ..EditSpec::new("a dog")
    };
    assert!(PromptToPrompt::new(
        &spec,
        &source.layout(),
        &edit.layout(),
        LENGTH,
        SourceMode::Batch
    )
    .is_err());

    // Batch mode needs two conditional items.
    let mut p2p = processor("a cat", "a dog", &EditSpec::new("a dog"), SourceMode::Batch);
    let cross = site(AttentionKind::Cross, 2, 2, 0, 4);
    let input = stack(&[&item_probs(&cross, 1), &item_probs(&cross, 2)]);
    let error = p2p.process_probabilities(&cross, &input).unwrap_err();
    assert!(error.to_string().contains("batch mode"), "{error}");
}

#[test]
fn chained_processors_see_the_edited_attention() {
    use crate::attention::store::{AttentionStore, StoreConfig};
    let spec = full_windows("a red circle");
    let mut p2p = processor("a red circle", "a red circle", &spec, SourceMode::Batch);
    let mut store = AttentionStore::new(StoreConfig {
        batch_item: 1,
        ..StoreConfig::new(LENGTH)
    });
    let cross = site(AttentionKind::Cross, 2, 4, 0, 1);
    let items: Vec<Tensor> = (0..4).map(|index| item_probs(&cross, 40 + index)).collect();
    let input = stack(&items.iter().collect::<Vec<_>>());
    {
        let mut chain = ChainedProcessors::new(vec![&mut p2p, &mut store]);
        let output = chain
            .process_probabilities(&cross, &input)
            .unwrap()
            .unwrap();
        assert_eq!(max_abs_diff(&item(&output, 3), &items[2]), 0.0);
    }
    store.finish_step().unwrap();
    // The store recorded the edited item, which is now the source's attention.
    let recorded = &store.latest_step().unwrap().groups[0].data;
    let expected = items[2]
        .mean(0)
        .unwrap()
        .t()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let diff = recorded
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-6, "{diff}");
}

#[test]
fn a_user_mask_replaces_the_word_mask() {
    // Left half of a 16x16 image mask; no blend words at all.
    let mask = BlendMask {
        h: 16,
        w: 16,
        data: (0..256)
            .map(|index| if index % 16 < 8 { 1.0 } else { 0.0 })
            .collect(),
    };
    let spec = EditSpec {
        local_blend: Some(LocalBlendConfig {
            mask: Some(mask),
            start_fraction: 0.0,
            ..LocalBlendConfig::new(Vec::new())
        }),
        ..EditSpec::new("a red square")
    };
    let mut p2p = processor("a red circle", "a red square", &spec, SourceMode::Batch);
    let source = Tensor::zeros((1, 4, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let edit = Tensor::ones((1, 4, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let blended = p2p
        .blend_edit_latents(0, 5, &source, &edit)
        .unwrap()
        .unwrap();
    let rows = blended
        .get(0)
        .unwrap()
        .get(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for row in rows {
        assert_eq!(row, [1.0, 1.0, 0.0, 0.0]);
    }
    let latest = p2p.latest_mask().unwrap();
    assert_eq!((latest.h, latest.w), (4, 4));
    assert_eq!(latest.coverage(), 0.5);

    // Without words and without a mask the spec is refused.
    let empty = EditSpec {
        local_blend: Some(LocalBlendConfig::new(Vec::new())),
        ..EditSpec::new("a red square")
    };
    let source_prompt = Prompt::new("a red circle");
    let edit_prompt = Prompt::new("a red square");
    assert!(PromptToPrompt::new(
        &empty,
        &source_prompt.layout(),
        &edit_prompt.layout(),
        LENGTH,
        SourceMode::Batch
    )
    .is_err());
}

#[test]
fn model_recommendations_replace_only_what_they_name() {
    use crate::analysis::edit_spec::EditDefaults;
    assert_eq!(
        SelfReplace::recommended(EditDefaults::default()),
        SelfReplace::default()
    );
    let both = EditDefaults {
        self_replace_end: Some(0.2),
        self_replace_max_side: Some(32),
    };
    assert_eq!(
        SelfReplace::recommended(both),
        SelfReplace {
            window: StepWindow::until(0.2),
            max_queries: 32 * 32,
        }
    );
    let side_only = EditDefaults {
        self_replace_end: None,
        self_replace_max_side: Some(8),
    };
    let recommended = SelfReplace::recommended(side_only);
    assert_eq!(recommended.window, SelfReplace::default().window);
    assert_eq!(recommended.max_queries, 64);
    // Recommendations are for edits that change words; a reweight of the source keeps the reference.
    let word_edit = SelfReplace::recommended(both);
    let swap = SelfReplace::for_edit(word_edit, "a red circle", "a red square");
    assert_eq!(swap, SelfReplace::recommended(both));
    let reweight_only = SelfReplace::for_edit(word_edit, "A red circle.", "a red  circle");
    assert_eq!(reweight_only, SelfReplace::default());
    assert!(changes_words("a red circle", "a red circle and a square"));
    assert!(!changes_words("a red circle", "a, Red circle"));
}

#[test]
fn scoped_blend_words_are_looked_up_in_their_own_prompt() {
    // "a circle and a square" -> "a square and a square": the edited prompt's first square (token
    // 2) is the swapped object; the source's first square (token 5) is the other one.
    let spec_with = |words: &[&str]| EditSpec {
        local_blend: Some(LocalBlendConfig::new(
            words.iter().map(|word| (*word).to_owned()).collect(),
        )),
        ..EditSpec::new("a square and a square")
    };
    let blended_tokens = |weights: &[[f32; 2]]| -> Vec<usize> {
        (0..weights.len())
            .filter(|&token| weights[token][0] > 0.0)
            .collect()
    };
    let plain = processor(
        "a circle and a square",
        "a square and a square",
        &spec_with(&["circle", "square#1"]),
        SourceMode::Batch,
    );
    assert_eq!(blended_tokens(&plain.source_blend_weights), vec![2, 5]);
    assert_eq!(blended_tokens(&plain.edit_blend_weights), vec![2]);
    let scoped = processor(
        "a circle and a square",
        "a square and a square",
        &spec_with(&["source:circle", "edit:square#1"]),
        SourceMode::Batch,
    );
    assert_eq!(blended_tokens(&scoped.source_blend_weights), vec![2]);
    assert_eq!(blended_tokens(&scoped.edit_blend_weights), vec![2]);
    // A scoped word missing from its prompt is an error naming it.
    let spec = spec_with(&["edit:circle"]);
    let source = Prompt::new("a circle and a square");
    let edit = Prompt::new("a square and a square");
    let err = PromptToPrompt::new(
        &spec,
        &source.layout(),
        &edit.layout(),
        LENGTH,
        SourceMode::Batch,
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("edit:circle"), "{err}");
}

#[test]
fn swapped_blend_words_name_each_changed_word_in_its_own_prompt() {
    let source = Prompt::new("a white circle and a yellow square");
    let edit = Prompt::new("a white square and a yellow square");
    assert_eq!(
        swapped_blend_words(&source.words, &edit.words),
        vec!["source:circle".to_string(), "edit:square#1".to_string()]
    );
    // Nothing changed, or a refinement (another word count): no words.
    assert!(swapped_blend_words(&source.words, &source.words).is_empty());
    let longer = Prompt::new("a white circle and a yellow square today");
    assert!(swapped_blend_words(&source.words, &longer.words).is_empty());
}

#[test]
fn the_inverted_image_window_replaces_only_the_window() {
    let recommended = SelfReplace {
        window: StepWindow::until(0.2),
        max_queries: 32 * 32,
    };
    let ended = InvertedImageSwap {
        local_blend: true,
        self_replace_end: Some(0.05),
        swapped_word_weight: 1.0,
    };
    assert_eq!(
        ended.self_replace(recommended),
        SelfReplace {
            window: StepWindow::until(0.05),
            max_queries: 32 * 32,
        }
    );
    let kept = InvertedImageSwap {
        self_replace_end: None,
        ..ended
    };
    assert_eq!(kept.self_replace(recommended), recommended);
}

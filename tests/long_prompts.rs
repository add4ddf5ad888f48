//! Prompts beyond 77 tokens: chunks of 75 content tokens, each with its start and end tokens,
//! encoded one by one and concatenated along the tokens; word spans index the concatenated
//! sequence; both halves of classifier-free guidance get the same chunk count; a run on the bundled
//! model and its word heat maps work across chunks.

// Test helpers outside `#[test]` functions unwrap too.
#![allow(clippy::unwrap_used)]

mod common;
use common::{fixture, generate_with_store, max_abs_diff};

use attend::analysis::heatmap::{word_heatmaps, AggregationSettings};
use attend::hook::CancelToken;
use attend::pipeline::model::{LoadOptions, StableDiffusion};
use attend::pipeline::sampling::{encode_prompt_batch, prepare_run, GenerateRequest};
use attend::pipeline::tokenizer::{PromptTokenizer, MAX_PROMPT_CHUNKS};
use attend::worker::bundled_model_dir;

/// `count` distinct one-token words of CLIP's vocabulary, cycling.
fn words(count: usize) -> Vec<&'static str> {
    let vocabulary = [
        "cat", "dog", "red", "blue", "house", "tree", "sky", "sun", "car", "hat",
    ];
    (0..count)
        .map(|index| vocabulary[index % vocabulary.len()])
        .collect()
}

#[test]
fn a_hundred_words_make_two_chunks_with_spans_in_the_second() {
    let tokenizer = PromptTokenizer::from_folder(&fixture("tiny-sd1/tokenizer")).unwrap();
    let prompt = words(100).join(" ");
    let encoded = tokenizer.encode_prompt(&prompt).unwrap();
    assert_eq!(encoded.chunk_count, 2);
    assert_eq!(encoded.ids.len(), 154);
    assert_eq!(encoded.truncated_from, None);
    assert_eq!(encoded.warning(), None);
    // Chunk 1: start, 75 words, end; chunk 2: start, 25 words, end, padding.
    let first_75 = tokenizer.encode(&words(75).join(" ")).unwrap();
    assert_eq!(encoded.ids[..77], first_75.ids[..]);
    let last_25 = tokenizer.encode(&words(100)[75..].join(" ")).unwrap();
    assert_eq!(encoded.ids[77..], last_25.ids[..]);
    assert_eq!(encoded.token_count(), 77 + 27);
    assert_eq!(encoded.tokens[77], "<|startoftext|>");
    assert_eq!(encoded.tokens[103], "<|endoftext|>");
    // Word 76 is the second chunk's first word, after its start token.
    assert_eq!(encoded.words.len(), 100);
    assert_eq!(encoded.words[74].token_indices, [75]);
    assert_eq!(encoded.words[75].token_indices, [78]);
    assert_eq!(encoded.words[75].text, words(100)[75]);
    assert_eq!(encoded.words[99].token_indices, [102]);
    for word in &encoded.words {
        assert_eq!(
            encoded.tokens[word.token_indices[0]],
            format!("{}</w>", word.text)
        );
    }
}

#[test]
fn prompts_beyond_the_cap_are_cut_with_a_warning() {
    let tokenizer = PromptTokenizer::from_folder(&fixture("tiny-sd1/tokenizer")).unwrap();
    let encoded = tokenizer.encode_prompt(&words(230).join(" ")).unwrap();
    assert_eq!(encoded.chunk_count, MAX_PROMPT_CHUNKS);
    assert_eq!(encoded.ids.len(), 77 * MAX_PROMPT_CHUNKS);
    assert_eq!(encoded.words.len(), 225);
    assert_eq!(encoded.truncated_from, Some(232));
    assert_eq!(encoded.dropped_words.len(), 5);
    let warning = encoded.warning().unwrap();
    assert!(
        warning.starts_with("prompt truncated to 3 chunks of 77 tokens"),
        "{warning}"
    );
}

#[test]
fn each_chunk_is_encoded_alone_and_guidance_halves_share_the_chunk_count() {
    let model = StableDiffusion::load(&fixture("tiny-sd1"), &LoadOptions::default()).unwrap();
    let prompt = model
        .tokenizer
        .encode_prompt(&words(100).join(" "))
        .unwrap();
    let negative = model.tokenizer.encode_prompt("blurry").unwrap();
    assert_eq!(negative.chunk_count, 1);
    let embeddings = encode_prompt_batch(&model, &[&prompt], &negative, true).unwrap();
    assert_eq!(embeddings.dims()[..2], [2, 154]);

    let encode_one = |text: &str| {
        let tokens = model.tokenizer.encode(text).unwrap();
        let ids = candle_core::Tensor::new(tokens.ids.as_slice(), model.device())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        model
            .text_encoder
            .forward(&ids)
            .unwrap()
            .squeeze(0)
            .unwrap()
    };
    let first_chunk = embeddings.get(1).unwrap().narrow(0, 0, 77).unwrap();
    let diff = max_abs_diff(&first_chunk, &encode_one(&words(75).join(" ")));
    assert!(diff < 1e-6, "first chunk differs by {diff:.2e}");
    let second_chunk = embeddings.get(1).unwrap().narrow(0, 77, 77).unwrap();
    let diff = max_abs_diff(&second_chunk, &encode_one(&words(100)[75..].join(" ")));
    assert!(diff < 1e-6, "second chunk differs by {diff:.2e}");
    // The negative prompt's row: its chunk, then the empty prompt's.
    let negative_row = embeddings.get(0).unwrap();
    let diff = max_abs_diff(
        &negative_row.narrow(0, 0, 77).unwrap(),
        &encode_one("blurry"),
    );
    assert!(diff < 1e-6, "negative chunk differs by {diff:.2e}");
    let diff = max_abs_diff(&negative_row.narrow(0, 77, 77).unwrap(), &encode_one(""));
    assert!(diff < 1e-6, "padding chunk differs by {diff:.2e}");

    // A prepared run pads the tokens of both halves alike (the keys every layer sees).
    let mut request = GenerateRequest::new(&model, words(100).join(" "));
    request.negative_prompt = "blurry".into();
    let run = prepare_run(&model, &request).unwrap();
    assert_eq!(run.prompt_tokens.ids.len(), 154);
    assert_eq!(run.negative_tokens.ids.len(), 154);
    assert!(run
        .warnings
        .iter()
        .all(|warning| !warning.contains("truncated")));
}

#[test]
fn the_bundled_model_generates_a_long_prompt_with_heat_maps_across_chunks() {
    let model = StableDiffusion::load(&bundled_model_dir(), &LoadOptions::default()).unwrap();
    // 12 words per scene sentence, 8 sentences: 96 words, 2 chunks; the last "circle" in chunk 2.
    let sentence = "a red square and a blue star on a yellow background and";
    let prompt = format!("{} a green circle", [sentence; 7].join(" "));
    let mut request = GenerateRequest::new(&model, prompt);
    request.steps = 2;
    let run = prepare_run(&model, &request).unwrap();
    assert_eq!(run.prompt_tokens.chunk_count, 2);
    let token_count = run.prompt_tokens.token_count();
    let (output, store) = generate_with_store(&model, &request);
    assert!(output
        .warnings
        .iter()
        .all(|warning| !warning.contains("truncated")));
    let circle = output.prompt_tokens.words.last().unwrap();
    assert_eq!(circle.text, "circle");
    assert!(circle.token_indices[0] > 77, "{:?}", circle.token_indices);
    assert!(store.steps()[1]
        .groups
        .iter()
        .all(|group| group.token_count == token_count));
    let heatmaps = word_heatmaps(
        store.steps(),
        std::slice::from_ref(circle),
        &AggregationSettings::default(),
        64,
        64,
    );
    assert!(heatmaps[0].peak > 0.0);
    assert!(heatmaps[0].data.iter().all(|v| v.is_finite()));
}

#[test]
fn prompt_to_prompt_swaps_a_word_in_the_second_chunk() {
    use attend::analysis::edit_spec::EditSpec;
    use attend::attention::edit_sampling::{generate_edit, EditObservers, EditRequest};
    let model = StableDiffusion::load(&fixture("tiny-sd1"), &LoadOptions::default()).unwrap();
    let source_words = words(100);
    let mut edit_words = source_words.clone();
    edit_words[90] = "boat";
    let mut request = GenerateRequest::new(&model, source_words.join(" "));
    request.steps = 2;
    for replay in [false, true] {
        let output = generate_edit(
            &model,
            &EditRequest {
                generate: request.clone(),
                spec: EditSpec::new(edit_words.join(" ")),
                replay,
            },
            EditObservers::default(),
            &mut |_| Ok(()),
            &CancelToken::new(),
        )
        .unwrap();
        assert_eq!(
            output.edited.prompt_tokens.chunk_count, 2,
            "replay {replay}"
        );
        let swapped: Vec<&str> = output
            .alignment
            .words
            .iter()
            .filter(|pair| pair.source_text != pair.edit_text)
            .map(|pair| pair.edit_text.as_str())
            .collect();
        assert_eq!(swapped, ["boat"], "replay {replay}");
        assert_ne!(output.source.image.pixels, output.edited.image.pixels);
    }
    // An edited prompt longer in chunks than its source is refused with the counts.
    let mut short = request.clone();
    short.prompt = "a cat".into();
    let error = generate_edit(
        &model,
        &EditRequest {
            generate: short,
            spec: EditSpec::new(source_words.join(" ")),
            replay: false,
        },
        EditObservers::default(),
        &mut |_| Ok(()),
        &CancelToken::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("2 chunks") && error.contains("source prompt 1"),
        "{error}"
    );
}

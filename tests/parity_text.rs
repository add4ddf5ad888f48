//! Parity of the prompt tokenizer and the CLIP text encoder with transformers' reference outputs
//! (fixtures in tests/fixtures, see its README).

// Test helpers outside `#[test]` functions unwrap too.
#![allow(clippy::unwrap_used)]

mod common;
use common::{fixture, max_abs_diff, read_json, references};

use attend::pipeline::clip::{ClipTextConfig, ClipTextEncoder};
use attend::pipeline::tokenizer::PromptTokenizer;
use candle_core::{DType, Device};

/// One case of `clip_tokenizer/reference_token_ids.json`.
#[derive(serde::Deserialize)]
struct ReferenceCase {
    prompt: String,
    input_ids: Vec<u32>,
    input_ids_padded_77: Vec<u32>,
    tokens: Vec<String>,
}

fn reference_cases() -> Vec<ReferenceCase> {
    let json = read_json(&fixture("clip_tokenizer/reference_token_ids.json"));
    let cases: Vec<ReferenceCase> = serde_json::from_value(json).unwrap();
    assert_eq!(cases.len(), 17);
    cases
}

#[test]
fn vocab_and_merges_tokenizer_matches_transformers() {
    let tokenizer = PromptTokenizer::from_folder(&fixture("tiny-sd1/tokenizer")).unwrap();
    assert_eq!(tokenizer.max_length(), 77);
    assert_eq!(tokenizer.pad_token().id, 49407);
    for case in reference_cases() {
        let encoded = tokenizer.encode(&case.prompt).unwrap();
        assert_eq!(
            encoded.ids, case.input_ids_padded_77,
            "ids of {:?}",
            case.prompt
        );
        let kept = case.input_ids.len().min(77);
        if case.input_ids.len() <= 77 {
            assert_eq!(encoded.tokens, case.tokens, "tokens of {:?}", case.prompt);
            assert_eq!(encoded.truncated_from, None);
        } else {
            // Truncated: the first 76 reference tokens, then the end token.
            assert_eq!(encoded.tokens[..kept - 1], case.tokens[..kept - 1]);
            assert_eq!(encoded.tokens[kept - 1], "<|endoftext|>");
            assert_eq!(encoded.truncated_from, Some(case.input_ids.len()));
        }
    }
}

#[test]
fn tokenizer_json_matches_transformers_up_to_the_end_token() {
    let tokenizer = PromptTokenizer::from_folder(&fixture("tiny-sd2/tokenizer")).unwrap();
    let pad_id = tokenizer.pad_token().id;
    assert_eq!(tokenizer.pad_token().text, "!");
    assert_eq!(pad_id, 0);
    for case in reference_cases() {
        let encoded = tokenizer.encode(&case.prompt).unwrap();
        if case.prompt.contains('!') {
            // The file registers its pad token "!" as a special token, so (as in transformers with
            // this folder) every "!" is its own token, id 0, instead of BPE's "!!!</w>".
            assert_eq!(encoded.ids[2..5], [0, 0, 0], "ids of {:?}", case.prompt);
            assert_eq!(encoded.ids[5..20], case.input_ids_padded_77[3..18]);
            continue;
        }
        let real_count = case.input_ids.len().min(77);
        assert_eq!(
            encoded.ids[..real_count],
            case.input_ids_padded_77[..real_count],
            "ids of {:?}",
            case.prompt
        );
        assert!(
            encoded.ids[real_count..].iter().all(|&id| id == pad_id),
            "padding of {:?}",
            case.prompt
        );
        assert_eq!(encoded.ids.len(), 77);
    }
}

/// A folder with SD2's `tokenizer_config.json` (pad `!`) but no `tokenizer.json` must tokenize
/// exactly like SD2's `tokenizer.json`: both paths register the special tokens the same way.
#[test]
fn both_tokenizer_paths_agree_with_pad_token_exclamation_mark() {
    let folder = tempfile::tempdir().unwrap();
    let sd2 = fixture("tiny-sd2/tokenizer");
    for file in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
        std::fs::copy(sd2.join(file), folder.path().join(file)).unwrap();
    }
    let from_vocab = PromptTokenizer::from_folder(folder.path()).unwrap();
    let from_json = PromptTokenizer::from_folder(&sd2).unwrap();
    for case in reference_cases() {
        let a = from_vocab.encode(&case.prompt).unwrap();
        let b = from_json.encode(&case.prompt).unwrap();
        assert_eq!(a, b, "{:?}", case.prompt);
    }
}

#[test]
fn tokenizer_gives_the_reference_input_ids() {
    for model in ["tiny-sd1", "tiny-sd2"] {
        let reference = references(model);
        let expected: Vec<Vec<i64>> = reference["text.input_ids"].to_vec2().unwrap();
        let tokenizer = PromptTokenizer::from_folder(&fixture(model).join("tokenizer")).unwrap();
        for (prompt, expected_ids) in ["a photo of a cat wearing sunglasses", ""]
            .iter()
            .zip(&expected)
        {
            let ids: Vec<i64> = tokenizer
                .encode(prompt)
                .unwrap()
                .ids
                .iter()
                .map(|&id| i64::from(id))
                .collect();
            assert_eq!(&ids, expected_ids, "{model} ids of {prompt:?}");
        }
    }
}

fn check_text_encoder(model: &str) {
    let folder = fixture(model).join("text_encoder");
    let config = ClipTextConfig::from_file(&folder.join("config.json")).unwrap();
    // SAFETY: the fixture file is not modified while the test maps it.
    #[allow(unsafe_code)]
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[folder.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let encoder = ClipTextEncoder::new(vb, &config).unwrap();
    let reference = references(model);
    let input_ids = reference["text.input_ids"].to_dtype(DType::U32).unwrap();
    let expected = &reference["text.last_hidden_state"];
    let output = encoder.forward(&input_ids).unwrap();
    assert_eq!(output.dims(), expected.dims());
    let batch_diff = max_abs_diff(&output, expected);
    eprintln!("{model} text encoder, batch of 2: max abs diff {batch_diff:e}");
    assert!(batch_diff < 1e-4, "{model}: max abs diff {batch_diff}");

    // Each prompt alone gives the same rows as the batch.
    for item in 0..2 {
        let single = encoder
            .forward(&input_ids.narrow(0, item, 1).unwrap())
            .unwrap();
        let diff = max_abs_diff(&single, &expected.narrow(0, item, 1).unwrap());
        eprintln!("{model} text encoder, item {item} alone: max abs diff {diff:e}");
        assert!(diff < 1e-4, "{model} item {item}: max abs diff {diff}");
    }
}

#[test]
fn sd1_text_encoder_matches_transformers() {
    check_text_encoder("tiny-sd1");
}

#[test]
fn sd2_text_encoder_matches_transformers() {
    check_text_encoder("tiny-sd2");
}

//! A1111 prompt syntax: a table of prompts with the text the tokenizer sees and the weights, the
//! swaps and their Prompt-to-Prompt windows, the errors with their columns, and the tokens of the
//! A1111 cases of `clip_tokenizer/reference_token_ids.json`.

// Test helpers outside `#[test]` functions unwrap too.
#![allow(clippy::unwrap_used)]

mod common;
use common::{fixture, read_json};

use attend::analysis::prompt_syntax::{parse_prompt, ParsedPrompt, PlainPrompt, SwitchAt};
use attend::pipeline::tokenizer::PromptTokenizer;

/// The weighted parts of a plain prompt as (text, weight).
fn weighted(prompt: &PlainPrompt) -> Vec<(&str, f32)> {
    prompt
        .weighted
        .iter()
        .map(|range| (&prompt.text[range.bytes.clone()], range.weight))
        .collect()
}

fn assert_weights(case: &str, got: &[(&str, f32)], expected: &[(&str, f32)]) {
    assert_eq!(got.len(), expected.len(), "{case:?}: {got:?}");
    for ((text, weight), (expected_text, expected_weight)) in got.iter().zip(expected) {
        assert_eq!(text, expected_text, "{case:?}");
        assert!(
            (weight - expected_weight).abs() < 1e-5,
            "{case:?}: {text:?} has {weight}, expected {expected_weight}"
        );
    }
}

/// (prompt, the text the tokenizer sees, its weighted parts).
type WeightCase = (&'static str, &'static str, &'static [(&'static str, f32)]);

#[test]
fn weights_table() {
    let cases: &[WeightCase] = &[
        ("a cat", "a cat", &[]),
        ("a (cat)", "a cat", &[("cat", 1.1)]),
        ("a ((cat))", "a cat", &[("cat", 1.21)]),
        ("a (((cat)))", "a cat", &[("cat", 1.331)]),
        ("a [cat]", "a cat", &[("cat", 1.0 / 1.1)]),
        ("a [[cat]]", "a cat", &[("cat", 1.0 / 1.21)]),
        ("a (cat:1.3)", "a cat", &[("cat", 1.3)]),
        ("a ( cat : 0.5 )", "a  cat ", &[(" cat ", 0.5)]),
        ("((cat:1.5))", "cat", &[("cat", 1.65)]),
        (
            "(a (cat:1.5) dog)",
            "a cat dog",
            &[("a ", 1.1), ("cat", 1.65), (" dog", 1.1)],
        ),
        ("([cat])", "cat", &[]),
        ("(cat:-1)", "cat", &[("cat", -1.0)]),
        ("(cat:0)", "cat", &[("cat", 0.0)]),
        ("a \\(cat\\) \\[dog\\]", "a (cat) [dog]", &[]),
        ("a \\\\ b", "a \\ b", &[]),
        (
            "a (photo: portrait)",
            "a photo: portrait",
            &[("photo: portrait", 1.1)],
        ),
        ("time 10:30", "time 10:30", &[]),
        ("{braces} <lora:x:0.5>", "{braces} <lora:x:0.5>", &[]),
        // The A1111 cases of the tokenizer fixture.
        (
            "a (masterpiece:1.3) portrait, [blurry], <lora:foo:0.5>",
            "a masterpiece portrait, blurry, <lora:foo:0.5>",
            &[("masterpiece", 1.3), ("blurry", 1.0 / 1.1)],
        ),
        (
            "punctuation!!! commas, dots... and (parentheses) [brackets] {braces}",
            "punctuation!!! commas, dots... and parentheses brackets {braces}",
            &[("parentheses", 1.1), ("brackets", 1.0 / 1.1)],
        ),
        ("Zürich (café:1.2)", "Zürich café", &[("café", 1.2)]),
    ];
    for &(prompt, text, expected) in cases {
        let parsed = parse_prompt(prompt).unwrap();
        assert_eq!(parsed.source.text, text, "{prompt:?}");
        assert_eq!(parsed.source, parsed.edited, "{prompt:?}");
        assert!(!parsed.has_swaps());
        assert_weights(prompt, &weighted(&parsed.source), expected);
        // Written back and parsed again: the same prompt.
        let again = parse_prompt(&parsed.source.to_syntax()).unwrap();
        assert_eq!(again.source.text, parsed.source.text, "{prompt:?}");
        assert_weights(prompt, &weighted(&again.source), &weighted(&parsed.source));
    }
}

fn swap_of(prompt: &str) -> ParsedPrompt {
    let parsed = parse_prompt(prompt).unwrap();
    assert_eq!(parsed.swaps.len(), 1, "{prompt:?}");
    parsed
}

#[test]
fn swaps_table() {
    let cases: &[(&str, &str, &str, SwitchAt)] = &[
        ("a [cat:dog:0.5]", "a cat", "a dog", SwitchAt::Fraction(0.5)),
        ("a [cat:dog:10]", "a cat", "a dog", SwitchAt::Step(10)),
        (
            "a [cat:dog: 0.25 ]",
            "a cat",
            "a dog",
            SwitchAt::Fraction(0.25),
        ),
        (
            "a [red cat:blue dog:3]",
            "a red cat",
            "a blue dog",
            SwitchAt::Step(3),
        ),
        (
            "a [hat:0.3] cat",
            "a  cat",
            "a hat cat",
            SwitchAt::Fraction(0.3),
        ),
        ("a [hat::5] cat", "a hat cat", "a  cat", SwitchAt::Step(5)),
        ("a [cat\\:x:dog:2]", "a cat:x", "a dog", SwitchAt::Step(2)),
    ];
    for &(prompt, source, edited, when) in cases {
        let parsed = swap_of(prompt);
        assert_eq!(parsed.source.text, source, "{prompt:?}");
        assert_eq!(parsed.edited.text, edited, "{prompt:?}");
        assert_eq!(parsed.swaps[0].when, when, "{prompt:?}");
    }

    // Weights inside and around a swap go to both prompts.
    let parsed = swap_of("a ([(cat:1.2):dog:0.5]:1.5) on a mat");
    assert_weights("around", &weighted(&parsed.source), &[("cat", 1.8)]);
    assert_weights("around", &weighted(&parsed.edited), &[("dog", 1.5)]);
    assert_eq!(parsed.edited.to_syntax(), "a (dog:1.5) on a mat");
}

#[test]
fn a_swap_becomes_a_cross_window_until_its_switch() {
    // 20 steps, switch at half: the edited prompt takes the source's attention for steps 0..10.
    let parsed = swap_of("a dog and a [cat:dog:0.5]");
    let windows = parsed.edit_windows(20).unwrap();
    assert_eq!(windows.default.cross_steps(20), 0..10);
    // "dog" is the edited prompt's second "dog".
    assert_eq!(windows.per_word.len(), 1);
    assert_eq!(windows.per_word[0].0, "dog#2");
    assert_eq!(windows.per_word[0].1.cross_steps(20), 0..10);
    // A step number: exactly that many steps; beyond the run, the whole run.
    for (steps, when, expected) in [(30, 7, 0..7), (5, 7, 0..5), (1, 1, 0..1)] {
        let window = SwitchAt::Step(when).cross_window(steps);
        assert_eq!(
            window.cross_steps(steps),
            expected,
            "{steps} steps, switch {when}"
        );
    }
    for steps in 1..60 {
        let window = SwitchAt::Fraction(0.3).cross_window(steps);
        assert_eq!(
            window.cross_steps(steps),
            0..(3 * steps / 10),
            "{steps} steps"
        );
    }
    // Two swaps: each its own window, the rest until the later switch.
    let parsed = parse_prompt("a [red:blue:0.2] [cat:dog:0.6]").unwrap();
    let windows = parsed.edit_windows(10).unwrap();
    assert_eq!(windows.default.cross_steps(10), 0..6);
    let names: Vec<(&str, std::ops::Range<usize>)> = windows
        .per_word
        .iter()
        .map(|(word, window)| (word.as_str(), window.cross_steps(10)))
        .collect();
    assert_eq!(names, [("blue#1", 0..2), ("dog#1", 0..6)]);
    assert!(parse_prompt("no swap").unwrap().edit_windows(10).is_none());
}

#[test]
fn errors_name_what_and_where() {
    let cases = [
        ("a photo (cat", "unclosed `(` at column 9"),
        ("a [cat", "unclosed `[` at column 3"),
        ("a cat)", "unmatched `)` at column 6"),
        ("a cat]", "unmatched `]` at column 6"),
        ("(a]", "`]` at column 3 does not close the `(` at column 1"),
        ("(cat:1.x)", "bad weight `1.x` at column 6"),
        ("(cat:1e999)", "bad weight `1e999`"),
        ("[cat:dog:1.5]", "bad switch `1.5` of the swap at column 1"),
        ("[cat:dog:0]", "bad switch `0`"),
        ("[cat:dog:-2]", "bad switch `-2`"),
        ("[cat:dog:x]", "bad switch `x`"),
        ("[cat:dog]", "bad switch `dog`"),
        ("[a:b:c:0.5]", "`[` at column 1 has 3 `:`"),
        (
            "[[a:b:0.5]:c:0.5]",
            "a `[from:to:when]` swap inside another one at column 2",
        ),
        ("first line\n(cat", "unclosed `(` at line 2, column 1"),
    ];
    for (prompt, expected) in cases {
        let message = parse_prompt(prompt).unwrap_err().to_string();
        assert!(
            message.starts_with("invalid prompt: "),
            "{prompt:?}: {message}"
        );
        assert!(message.contains(expected), "{prompt:?}: {message}");
    }
}

/// One case of `clip_tokenizer/reference_token_ids.json`.
#[derive(serde::Deserialize)]
struct ReferenceCase {
    prompt: String,
    input_ids: Vec<u32>,
    input_ids_padded_77: Vec<u32>,
}

#[test]
fn tokens_follow_the_plain_text_and_plain_prompts_are_unchanged() {
    let tokenizer = PromptTokenizer::from_folder(&fixture("tiny-sd1/tokenizer")).unwrap();
    let cases: Vec<ReferenceCase> = serde_json::from_value(read_json(&fixture(
        "clip_tokenizer/reference_token_ids.json",
    )))
    .unwrap();
    let mut plain_cases = 0;
    for case in &cases {
        let with_syntax = tokenizer.encode_prompt(&case.prompt).unwrap();
        let plain = parse_prompt(&case.prompt).unwrap().source.text;
        if plain == case.prompt && case.input_ids.len() <= 77 {
            // No syntax, at most 75 content tokens: exactly the reference's tokens, no weights.
            assert_eq!(
                with_syntax.ids, case.input_ids_padded_77,
                "{:?}",
                case.prompt
            );
            assert_eq!(with_syntax, tokenizer.encode(&case.prompt).unwrap());
            assert!(!with_syntax.has_weights());
            plain_cases += 1;
        } else if plain != case.prompt {
            assert_eq!(with_syntax.ids, tokenizer.encode(&plain).unwrap().ids);
        }
    }
    assert_eq!(plain_cases, 14);

    let encoded = tokenizer
        .encode_prompt("a (masterpiece:1.3) portrait, [blurry], <lora:foo:0.5>")
        .unwrap();
    let words: Vec<(&str, f32)> = encoded
        .words
        .iter()
        .zip(encoded.word_weights())
        .map(|(word, weight)| (word.text.as_str(), weight))
        .collect();
    assert_weights(
        "masterpiece",
        &words[..5],
        &[
            ("a", 1.0),
            ("masterpiece", 1.3),
            ("portrait", 1.0),
            ("blurry", 1.0 / 1.1),
            ("lora", 1.0),
        ],
    );
    // Start, end and padding keep weight 1.
    assert_eq!(encoded.weights.len(), 77);
    assert_eq!(encoded.weights[0], 1.0);
    assert_eq!(encoded.weights[76], 1.0);

    let error = tokenizer.encode_prompt("a photo of (a cat").unwrap_err();
    assert_eq!(
        error.to_string(),
        "invalid prompt: unclosed `(` at column 12"
    );
}

#[test]
fn tokenizer_words_find_their_weights_in_the_text() {
    let tokenizer = PromptTokenizer::from_folder(&fixture("tiny-sd1/tokenizer")).unwrap();
    let prompt = "A (Red:1.5) cat, [well-known] ((Zürich)) red";
    let parsed = parse_prompt(prompt).unwrap();
    let encoded = tokenizer.encode_prompt(prompt).unwrap();
    let found = parsed.source.word_weights(&encoded.words);
    let from_tokens = encoded.word_weights();
    let texts: Vec<&str> = encoded
        .words
        .iter()
        .map(|word| word.text.as_str())
        .collect();
    assert_eq!(texts, ["a", "red", "cat", "well", "known", "zürich", "red"]);
    let expected = [1.0, 1.5, 1.0, 1.0 / 1.1, 1.0 / 1.1, 1.21, 1.0];
    for ((got, tokens), expected) in found.iter().zip(&from_tokens).zip(expected) {
        assert!((got - expected).abs() < 1e-5, "{found:?}");
        assert!((tokens - expected).abs() < 1e-5, "{from_tokens:?}");
    }
}

/// The bundled model's image of `prompt` (2 steps), weights applied as the editor applies them.
fn weighted_image(model: &attend::pipeline::model::StableDiffusion, prompt: &str) -> Vec<u8> {
    use attend::attention::prompt_weights::{PromptWeights, WeightedRun};
    use attend::hook::CancelToken;
    use attend::pipeline::sampling::{prepare_run, run_to_end, GenerateRequest, Sampler};
    let mut request = GenerateRequest::new(model, prompt);
    request.steps = 2;
    request.seed = 5;
    let run = prepare_run(model, &request).unwrap();
    let weights = PromptWeights::new(&run.prompt_tokens.weights);
    let mut sampler = WeightedRun::new(Sampler::new(model, run).unwrap(), weights);
    run_to_end(&mut sampler, None, &mut |_| Ok(()), &CancelToken::new()).unwrap();
    sampler.into_inner().finish().unwrap().image.pixels
}

#[test]
fn weights_change_the_image_and_a_weight_of_one_does_not() {
    use attend::pipeline::model::{LoadOptions, StableDiffusion};
    let model = StableDiffusion::load(
        &attend::worker::bundled_model_dir(),
        &LoadOptions::default(),
    )
    .unwrap();
    let plain = weighted_image(&model, "a red circle");
    assert_eq!(weighted_image(&model, "a (red:1) circle"), plain);
    // Brackets that are text: the same tokens as the unescaped text through the raw tokenizer.
    let escaped = model.tokenizer.encode_prompt("a \\(red\\) circle").unwrap();
    assert_eq!(
        escaped.ids,
        model.tokenizer.encode("a (red) circle").unwrap().ids
    );
    assert_ne!(weighted_image(&model, "a (red:1.5) circle"), plain);
}

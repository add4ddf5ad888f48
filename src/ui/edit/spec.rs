//! The edit's spec as the panel and the token strip change it: the whitespace preview of the
//! alignment (before the engine's tokenizer answers), word weights, local-blend words and pruning.
//! Plain functions over [`EditSpec`], no egui.

use crate::analysis::alignment::{
    align_prompts, split_prompt_scope, word_selector, word_token_indices, EditKind, PromptLayout,
    WordChange, WordPair,
};
use crate::analysis::WordSpan;
use crate::worker::{EditSpec, LocalBlendConfig, Reweight};

/// Range of the word weights (reweight); 1 changes nothing. It holds the swapped words' weight of
/// an edit of an inverted image ([`crate::worker::INVERTED_IMAGE_SWAP`], 4).
pub(crate) const WEIGHT_RANGE: std::ops::RangeInclusive<f32> = -2.0..=5.0;

/// The words of a prompt split at whitespace, punctuation dropped, lower-cased; tokens are the words
/// between `<start>` and `<end>` (the alignment preview before the engine's tokenizer answers).
pub(crate) fn whitespace_layout(prompt: &str) -> (Vec<String>, Vec<WordSpan>) {
    let mut tokens = vec!["<start>".to_owned()];
    let mut words = Vec::new();
    for text in crate::analysis::plain_words(prompt) {
        tokens.push(text.clone());
        words.push(WordSpan {
            text,
            token_indices: vec![tokens.len() - 1],
        });
    }
    tokens.push("<end>".to_owned());
    (tokens, words)
}

/// The alignment of two prompts by [`whitespace_layout`].
pub(crate) fn preview_alignment(
    source: &str,
    edit: &str,
    kind: Option<EditKind>,
) -> Result<(EditKind, Vec<WordPair>), String> {
    let (source_tokens, source_words) = whitespace_layout(source);
    let (edit_tokens, edit_words) = whitespace_layout(edit);
    let length = source_tokens.len().max(edit_tokens.len()) + 1;
    align_prompts(
        &PromptLayout {
            tokens: &source_tokens,
            words: &source_words,
        },
        &PromptLayout {
            tokens: &edit_tokens,
            words: &edit_words,
        },
        length,
        kind,
    )
    .map(|alignment| (alignment.kind, alignment.words))
    .map_err(|error| error.to_string())
}

/// The weight of `word` in `spec` (1 without a reweight).
pub(crate) fn word_weight(spec: &EditSpec, word: &str) -> f32 {
    spec.reweights
        .iter()
        .find(|reweight| reweight.word.eq_ignore_ascii_case(word))
        .map_or(1.0, |reweight| reweight.scale)
}

/// Sets the weight of `word` (a weight of 1 removes the reweight).
pub(crate) fn set_word_weight(spec: &mut EditSpec, word: &str, scale: f32) {
    spec.reweights
        .retain(|reweight| !reweight.word.eq_ignore_ascii_case(word));
    if (scale - 1.0).abs() > 1e-4 {
        spec.reweights.push(Reweight {
            word: word.to_owned(),
            scale,
        });
    }
}

/// True when `word` (a word selector such as `square#2`) is a local-blend word of `spec`.
pub(crate) fn is_blend_word(spec: &EditSpec, word: &str) -> bool {
    spec.local_blend.as_ref().is_some_and(|blend| {
        blend
            .words
            .iter()
            .any(|blend_word| blend_word.eq_ignore_ascii_case(word))
    })
}

/// Adds or removes local-blend words; the blend is dropped when it has neither words nor a mask.
pub(crate) fn set_blend_words(spec: &mut EditSpec, words: &[&str], on: bool) {
    let blend = spec
        .local_blend
        .get_or_insert_with(|| LocalBlendConfig::new(Vec::new()));
    for word in words.iter().filter(|word| !word.is_empty()) {
        blend
            .words
            .retain(|blend_word| !blend_word.eq_ignore_ascii_case(word));
        if on {
            blend.words.push((*word).to_owned());
        }
    }
    if blend.words.is_empty() && blend.mask.is_none() {
        spec.local_blend = None;
    }
}

/// The local-blend words of one aligned pair: its source word and its edited word, each named by
/// position when the text repeats ("square#2"), so that in "a red square and a blue square" the
/// blue square's checkbox blends only the blue square.
pub(crate) fn pair_blend_selectors(
    pair: &WordPair,
    source_words: &[WordSpan],
    edit_words: &[WordSpan],
) -> Vec<String> {
    let source_selector = pair
        .source_word
        .map(|index| word_selector(source_words, index, edit_words))
        .filter(|selector| !selector.is_empty());
    let edit_selector = pair
        .edit_word
        .map(|index| word_selector(edit_words, index, source_words))
        .filter(|selector| !selector.is_empty());
    // A selector that would also pick a word of the other prompt is kept to its own prompt
    // ("edit:square#1" when the source's first square is another object), unless both prompts'
    // selectors are the same (an unchanged word, looked up in both).
    let scoped = |selector: String, scope: &str, other: &[WordSpan]| {
        if word_token_indices(other, &selector).is_empty() {
            selector
        } else {
            format!("{scope}:{selector}")
        }
    };
    let mut selectors = Vec::with_capacity(2);
    match (source_selector, edit_selector) {
        (Some(source), Some(edit)) if source == edit => selectors.push(source),
        (source, edit) => {
            selectors.extend(source.map(|selector| scoped(selector, "source", edit_words)));
            selectors.extend(edit.map(|selector| scoped(selector, "edit", source_words)));
        }
    }
    selectors
}

/// Drops reweights and blend words that are no longer words of the prompts (after the edited
/// prompt changed), so the engine does not refuse the spec.
pub(crate) fn prune_spec(spec: &mut EditSpec, source_prompt: &str) {
    let (_, edit_words) = whitespace_layout(&spec.edit_prompt);
    let (_, source_words) = whitespace_layout(source_prompt);
    let in_edit = |word: &str| !word_token_indices(&edit_words, word).is_empty();
    let in_source = |word: &str| !word_token_indices(&source_words, word).is_empty();
    spec.reweights.retain(|reweight| in_edit(&reweight.word));
    if let Some(blend) = &mut spec.local_blend {
        blend.words.retain(|word| {
            let (source_scope, edit_scope, selector) = split_prompt_scope(word);
            (edit_scope && in_edit(selector)) || (source_scope && in_source(selector))
        });
        if blend.words.is_empty() && blend.mask.is_none() {
            spec.local_blend = None;
        }
    }
}

/// The local-blend selectors of the swapped words of `edit_prompt` against `source_prompt` (by
/// the preview alignment): what entering edit mode from a screenshot plan blends.
pub(crate) fn swapped_word_selectors(source_prompt: &str, edit_prompt: &str) -> Vec<String> {
    let Ok((_, pairs)) = preview_alignment(source_prompt, edit_prompt, None) else {
        return Vec::new();
    };
    // The same selectors as the blend checkboxes: a repeated word by its occurrence.
    let (_, source_words) = whitespace_layout(source_prompt);
    let (_, edit_words) = whitespace_layout(edit_prompt);
    pairs
        .iter()
        .filter(|pair| pair.change == WordChange::Swapped)
        .flat_map(|pair| pair_blend_selectors(pair, &source_words, &edit_words))
        .collect()
}

/// The swapped words of `edit_prompt` against `source_prompt` (by the preview alignment), named
/// in the edited prompt alone ("square#2" where the word repeats): the words a swap's weight acts
/// on.
pub(crate) fn swapped_edit_words(source_prompt: &str, edit_prompt: &str) -> Vec<String> {
    let Ok((_, pairs)) = preview_alignment(source_prompt, edit_prompt, None) else {
        return Vec::new();
    };
    let (_, edit_words) = whitespace_layout(edit_prompt);
    pairs
        .iter()
        .filter(|pair| pair.change == WordChange::Swapped)
        .filter_map(|pair| pair.edit_word)
        .map(|index| word_selector(&edit_words, index, &[]))
        .filter(|selector| !selector.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_weight_sliders_hold_the_inverted_image_swap_weight() {
        assert!(WEIGHT_RANGE.contains(&crate::worker::INVERTED_IMAGE_SWAP.swapped_word_weight));
    }

    #[test]
    fn the_preview_alignment_marks_swaps_and_insertions() {
        let (kind, words) = preview_alignment("a red circle", "a red square", None).unwrap();
        assert_eq!(kind, EditKind::Replace);
        assert_eq!(words[2].change, WordChange::Swapped);
        assert_eq!(
            (words[2].source_text.as_str(), words[2].edit_text.as_str()),
            ("circle", "square")
        );
        let (kind, words) = preview_alignment("a circle", "a big circle", None).unwrap();
        assert_eq!(kind, EditKind::Refine);
        assert!(words
            .iter()
            .any(|pair| pair.change == WordChange::Added && pair.edit_text == "big"));
    }

    #[test]
    fn weights_and_blend_words_edit_the_spec() {
        let mut spec = EditSpec::new("a red square");
        set_word_weight(&mut spec, "red", 2.0);
        assert_eq!(word_weight(&spec, "red"), 2.0);
        set_word_weight(&mut spec, "red", 1.0);
        assert!(spec.reweights.is_empty(), "a weight of 1 is no reweight");
        set_blend_words(&mut spec, &["circle", "square"], true);
        assert!(is_blend_word(&spec, "square"));
        set_blend_words(&mut spec, &["circle", "square"], false);
        assert!(spec.local_blend.is_none());
        set_word_weight(&mut spec, "square", 0.5);
        spec.edit_prompt = "a red circle".to_owned();
        prune_spec(&mut spec, "a red circle");
        assert!(spec.reweights.is_empty(), "square left the edited prompt");
    }

    #[test]
    fn blend_checkboxes_name_repeated_words_by_position() {
        let source = "a red square and a blue square";
        let edit = "a red square and a blue circle";
        let (_, pairs) = preview_alignment(source, edit, None).unwrap();
        let (_, source_words) = whitespace_layout(source);
        let (_, edit_words) = whitespace_layout(edit);
        let selectors: Vec<Vec<String>> = pairs
            .iter()
            .map(|pair| pair_blend_selectors(pair, &source_words, &edit_words))
            .collect();
        assert_eq!(selectors[2], vec!["square#1"]);
        assert_eq!(selectors[6], vec!["square#2", "circle"]);
        assert_eq!(selectors[5], vec!["blue"]);
        // Only the blue square's tokens are selected in the source, and the blend survives pruning.
        assert_eq!(word_token_indices(&source_words, "square#2"), vec![7]);
        let mut spec = EditSpec::new(edit);
        let words: Vec<&str> = selectors[6].iter().map(String::as_str).collect();
        set_blend_words(&mut spec, &words, true);
        prune_spec(&mut spec, source);
        assert!(is_blend_word(&spec, "square#2") && is_blend_word(&spec, "circle"));
        assert!(!is_blend_word(&spec, "square#1"));

        // The other way round the source has no second square, so the plain selector is safe.
        let (source, edit) = (edit, source);
        let (_, pairs) = preview_alignment(source, edit, None).unwrap();
        let (_, source_words) = whitespace_layout(source);
        let (_, edit_words) = whitespace_layout(edit);
        let swapped = pair_blend_selectors(&pairs[6], &source_words, &edit_words);
        assert_eq!(swapped, vec!["circle", "square#2"]);
        // But when the swapped word comes first, the edited prompt's first square is the red one
        // and the source's first square the blue one: the selector is kept to the edited prompt.
        let (_, pairs) = preview_alignment(
            "a red circle and a blue square",
            "a red square and a blue square",
            None,
        )
        .unwrap();
        let (_, source_words) = whitespace_layout("a red circle and a blue square");
        let (_, edit_words) = whitespace_layout("a red square and a blue square");
        let swapped = pair_blend_selectors(&pairs[2], &source_words, &edit_words);
        assert_eq!(swapped, vec!["circle", "edit:square#1"]);
        let mut spec = EditSpec::new("a red square and a blue square");
        let words: Vec<&str> = swapped.iter().map(String::as_str).collect();
        set_blend_words(&mut spec, &words, true);
        prune_spec(&mut spec, "a red circle and a blue square");
        assert!(is_blend_word(&spec, "edit:square#1") && is_blend_word(&spec, "circle"));
    }
}

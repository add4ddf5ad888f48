//! Prompt-to-Prompt alignment: which tokens of the source prompt each token of the edited prompt
//! takes its cross-attention from. Plain data; [`crate::attention::p2p`] turns it into tensors.
//!
//! After google/prompt-to-prompt `seq_aligner.py`:
//!
//! | edit | function | rule |
//! |---|---|---|
//! | word swap ("replace") | [`replace_mapping`] | same word count; words pair by position; a word whose token count changes spreads each source token over the new tokens, `1/n` each |
//! | words added or removed ("refine") | [`refine_mapping`] | global alignment of the token sequences, gap 0, match 1, mismatch -1; matched tokens copy the source (`alpha = 1`), new tokens keep their own attention (`alpha = 0`) |
//! | which one | [`infer_edit_kind`] | same word count: replace, otherwise refine |
//!
//! Both become one [`TokenMapping`]: edited token `e` takes
//! `alpha[e] * Σ_s weights[s, e] * source[s] + (1 - alpha[e]) * own[e]`.
//!
//! Deliberate differences from the reference, both about tokens outside the words:
//! - Replace: after the last swapped word the reference pairs the remaining tokens position to
//!   position in the *edited* prompt (`mapper[j, j]`), which shifts them by one when a swapped word
//!   changes its token count. Here every token outside a word pairs with the next source token outside
//!   a word, before and after the swaps alike.
//! - Refine: the reference maps the edited prompt's padding position `k` to source position `k`,
//!   which for a shorter edit is a source *word* token. Here padding pairs with padding, counted from
//!   the end tokens (source position `k - edit_len + source_len`); edited padding with no source
//!   counterpart keeps its own attention.
//!
//! Prompts are split into words by the tokenizer ([`WordSpan`], punctuation-only words left out),
//! not by spaces as in the reference, so `"a cat, sitting"` has the words `a`, `cat`, `sitting`.

use crate::analysis::WordSpan;
use crate::analysis::{AnalysisError, AnalysisResult};

/// One encoded prompt as the aligner needs it (from `PromptTokens::tokens` and `PromptTokens::words`).
#[derive(Clone, Copy, Debug)]
pub struct PromptLayout<'a> {
    /// The real tokens as the tokenizer spells them: start token, content tokens, end token (no
    /// padding). Tokens are compared by their spelling.
    pub tokens: &'a [String],
    /// The prompt's words; indices point into the token sequence (start token = 0).
    pub words: &'a [WordSpan],
}

/// How the edited prompt relates to the source prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum EditKind {
    /// Word swap: the same number of words, some of them different.
    Replace,
    /// Words added or removed: token sequences aligned globally.
    Refine,
}

/// The token-level mapping of an edit over the full encoded length (77 for CLIP):
/// edited token `e` takes `alpha[e] * Σ_s weights[s * length + e] * source[s] + (1 - alpha[e]) * own[e]`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenMapping {
    /// Encoded sequence length (both prompts, padding included).
    pub length: usize,
    /// `[source token, edited token]`, row-major, `length * length` values.
    pub weights: Vec<f32>,
    /// `[edited token]`: how much of the edited token's attention comes from the source (1) rather
    /// than from itself (0).
    pub alphas: Vec<f32>,
}

impl TokenMapping {
    /// Every edited token takes the source token at the same position.
    pub fn identity(length: usize) -> Self {
        let mut weights = vec![0.0; length * length];
        for position in 0..length {
            weights[position * length + position] = 1.0;
        }
        Self {
            length,
            weights,
            alphas: vec![1.0; length],
        }
    }

    /// True when this mapping copies every source token to the same position (identical prompts).
    pub fn is_identity(&self) -> bool {
        self.alphas.iter().all(|&alpha| alpha == 1.0)
            && self.weights.iter().enumerate().all(|(index, &weight)| {
                let expected = if index / self.length == index % self.length {
                    1.0
                } else {
                    0.0
                };
                weight == expected
            })
    }

    /// True when every alpha is 1 (a pure replace mapping: no token keeps its own attention).
    pub fn is_fully_mapped(&self) -> bool {
        self.alphas.iter().all(|&alpha| alpha == 1.0)
    }

    /// Weight of source token `source` in edited token `edit` (0 outside the sequence).
    pub fn weight(&self, source: usize, edit: usize) -> f32 {
        if source >= self.length || edit >= self.length {
            return 0.0;
        }
        self.weights[source * self.length + edit]
    }

    /// The source tokens edited token `edit` takes attention from, with their weights.
    pub fn sources_of(&self, edit: usize) -> Vec<(usize, f32)> {
        (0..self.length)
            .map(|source| (source, self.weight(source, edit)))
            .filter(|&(_, weight)| weight != 0.0)
            .collect()
    }

    fn set(&mut self, source: usize, edit: usize, weight: f32) {
        if source < self.length && edit < self.length {
            self.weights[source * self.length + edit] = weight;
        }
    }

    fn empty(length: usize) -> Self {
        Self {
            length,
            weights: vec![0.0; length * length],
            alphas: vec![1.0; length],
        }
    }
}

/// What happened to a word between the two prompts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum WordChange {
    /// The same word in both prompts.
    Same,
    /// A different word in the same place (replace).
    Swapped,
    /// Only in the edited prompt.
    Added,
    /// Only in the source prompt.
    Removed,
}

/// One row of the word-to-word alignment the editor shows.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WordPair {
    /// Index into the source prompt's words, `None` for an added word.
    pub source_word: Option<usize>,
    /// Index into the edited prompt's words, `None` for a removed word.
    pub edit_word: Option<usize>,
    /// The source word's text (empty for an added word).
    pub source_text: String,
    /// The edited word's text (empty for a removed word).
    pub edit_text: String,
    /// What changed.
    pub change: WordChange,
}

/// Everything the editor and the attention processor need about an edit.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PromptAlignment {
    /// Replace or refine.
    pub kind: EditKind,
    /// The token mapping the processor applies.
    pub mapping: TokenMapping,
    /// Word-to-word listing in prompt order (removed words where they were).
    pub words: Vec<WordPair>,
}

/// Replace when both prompts have the same number of words, refine otherwise.
pub fn infer_edit_kind(source: &PromptLayout<'_>, edit: &PromptLayout<'_>) -> EditKind {
    if source.words.len() == edit.words.len() {
        EditKind::Replace
    } else {
        EditKind::Refine
    }
}

/// Aligns the two prompts with the given kind (or the inferred one when `kind` is `None`).
/// `length` is the encoded sequence length (77 for CLIP). Fails for a replace between prompts with
/// different word counts.
pub fn align_prompts(
    source: &PromptLayout<'_>,
    edit: &PromptLayout<'_>,
    length: usize,
    kind: Option<EditKind>,
) -> AnalysisResult<PromptAlignment> {
    let kind = kind.unwrap_or_else(|| infer_edit_kind(source, edit));
    match kind {
        EditKind::Replace => {
            let mapping = replace_mapping(source, edit, length)?;
            let words = source
                .words
                .iter()
                .zip(edit.words)
                .enumerate()
                .map(|(index, (source_word, edit_word))| WordPair {
                    source_word: Some(index),
                    edit_word: Some(index),
                    source_text: source_word.text.clone(),
                    edit_text: edit_word.text.clone(),
                    change: if source_word.text == edit_word.text {
                        WordChange::Same
                    } else {
                        WordChange::Swapped
                    },
                })
                .collect();
            Ok(PromptAlignment {
                kind,
                mapping,
                words,
            })
        }
        EditKind::Refine => {
            let token_sources = align_tokens(source.tokens, edit.tokens);
            let words = refine_word_pairs(source, edit, &token_sources);
            let mapping = refine_mapping_from(
                &token_sources,
                source.tokens.len(),
                edit.tokens.len(),
                length,
            );
            Ok(PromptAlignment {
                kind,
                mapping,
                words,
            })
        }
    }
}

/// Word-swap mapping: words pair by position; a pair with equal token counts maps token to token,
/// otherwise every source token of the word goes to every edited token of the word with weight
/// `1 / edited token count` (the word's attention spread evenly). Tokens outside words (start, end,
/// punctuation, padding) pair in order. Fails when the word counts differ.
pub fn replace_mapping(
    source: &PromptLayout<'_>,
    edit: &PromptLayout<'_>,
    length: usize,
) -> AnalysisResult<TokenMapping> {
    if source.words.len() != edit.words.len() {
        return Err(AnalysisError::InvalidArgument {
            name: "edit prompt",
            reason: format!(
                "a word swap needs the same number of words: the source has {} ({}), the edit {} ({}); \
                 use a refine edit to add or remove words",
                source.words.len(),
                word_list(source.words),
                edit.words.len(),
                word_list(edit.words)
            ),
        });
    }
    let mut mapping = TokenMapping::empty(length);
    let word_starting_at = |words: &[WordSpan], word: usize, position: usize| {
        words
            .get(word)
            .and_then(|span| span.token_indices.first())
            .is_some_and(|&first| first == position)
    };
    let (mut source_pos, mut edit_pos, mut word) = (0usize, 0usize, 0usize);
    while source_pos < length && edit_pos < length {
        let source_word_here = word_starting_at(source.words, word, source_pos);
        let edit_word_here = word_starting_at(edit.words, word, edit_pos);
        match (source_word_here, edit_word_here) {
            (true, true) => {
                let source_tokens = &source.words[word].token_indices;
                let edit_tokens = &edit.words[word].token_indices;
                if source_tokens.len() == edit_tokens.len() {
                    for (&from, &to) in source_tokens.iter().zip(edit_tokens) {
                        mapping.set(from, to, 1.0);
                    }
                } else {
                    let share = 1.0 / edit_tokens.len() as f32;
                    for &from in source_tokens {
                        for &to in edit_tokens {
                            mapping.set(from, to, share);
                        }
                    }
                }
                source_pos = source_tokens.last().map_or(source_pos, |&last| last + 1);
                edit_pos = edit_tokens.last().map_or(edit_pos, |&last| last + 1);
                word += 1;
            }
            (false, false) => {
                mapping.set(source_pos, edit_pos, 1.0);
                source_pos += 1;
                edit_pos += 1;
            }
            // A token outside words (punctuation) only the edit has: nothing to copy.
            (true, false) => edit_pos += 1,
            // One only the source has: dropped.
            (false, true) => source_pos += 1,
        }
    }
    Ok(mapping)
}

/// Refine mapping: the token sequences (start and end tokens included) aligned globally with gap 0,
/// match 1, mismatch -1; an edited token matched to a source token copies it (`alpha = 1`), an
/// unmatched one keeps its own attention (`alpha = 0`). Padding pairs with padding (see the module
/// docs).
pub fn refine_mapping(
    source: &PromptLayout<'_>,
    edit: &PromptLayout<'_>,
    length: usize,
) -> TokenMapping {
    let token_sources = align_tokens(source.tokens, edit.tokens);
    refine_mapping_from(
        &token_sources,
        source.tokens.len(),
        edit.tokens.len(),
        length,
    )
}

/// Global alignment of two token sequences (gap 0, match 1, mismatch -1): for each edited token,
/// the source token it matches, or `None` for a token the source does not have. Ties resolve like
/// the reference: a gap in the source first, then a gap in the edit, then a match.
pub fn align_tokens(source: &[String], edit: &[String]) -> Vec<Option<usize>> {
    const GAP: i32 = 0;
    const MATCH: i32 = 1;
    const MISMATCH: i32 = -1;
    #[derive(Clone, Copy, PartialEq)]
    enum Move {
        /// The edited token has no source (came from the left).
        EditOnly,
        /// The source token has no edited counterpart (came from above).
        SourceOnly,
        /// Matched pair (came diagonally).
        Pair,
    }
    let rows = source.len() + 1;
    let columns = edit.len() + 1;
    let mut score = vec![0i32; rows * columns];
    let mut moves = vec![Move::Pair; rows * columns];
    for column in 1..columns {
        score[column] = column as i32 * GAP;
        moves[column] = Move::EditOnly;
    }
    for row in 1..rows {
        score[row * columns] = row as i32 * GAP;
        moves[row * columns] = Move::SourceOnly;
    }
    for row in 1..rows {
        for column in 1..columns {
            let left = score[row * columns + column - 1] + GAP;
            let up = score[(row - 1) * columns + column] + GAP;
            let pair_score = if source[row - 1] == edit[column - 1] {
                MATCH
            } else {
                MISMATCH
            };
            let diagonal = score[(row - 1) * columns + column - 1] + pair_score;
            let best = left.max(up).max(diagonal);
            score[row * columns + column] = best;
            moves[row * columns + column] = if best == left {
                Move::EditOnly
            } else if best == up {
                Move::SourceOnly
            } else {
                Move::Pair
            };
        }
    }
    let mut sources = vec![None; edit.len()];
    let (mut row, mut column) = (source.len(), edit.len());
    while row > 0 || column > 0 {
        match moves[row * columns + column] {
            Move::Pair => {
                row -= 1;
                column -= 1;
                sources[column] = Some(row);
            }
            Move::EditOnly => column -= 1,
            Move::SourceOnly => row -= 1,
        }
    }
    sources
}

/// Builds the refine [`TokenMapping`] from [`align_tokens`]' result.
fn refine_mapping_from(
    token_sources: &[Option<usize>],
    source_len: usize,
    edit_len: usize,
    length: usize,
) -> TokenMapping {
    let mut mapping = TokenMapping::empty(length);
    for edit_pos in 0..length {
        let source_pos = if edit_pos < edit_len {
            token_sources.get(edit_pos).copied().flatten()
        } else {
            // Padding, aligned from the end tokens.
            Some(edit_pos + source_len - edit_len).filter(|&position| position < length)
        };
        match source_pos {
            Some(source_pos) if source_pos < length => mapping.set(source_pos, edit_pos, 1.0),
            _ => mapping.alphas[edit_pos] = 0.0,
        }
    }
    mapping
}

/// The word listing of a refine: an edited word pairs with a source word when all its tokens match
/// all of that word's tokens; the other edited words are added, the other source words removed.
fn refine_word_pairs(
    source: &PromptLayout<'_>,
    edit: &PromptLayout<'_>,
    token_sources: &[Option<usize>],
) -> Vec<WordPair> {
    let source_word_of = |token: usize| {
        source
            .words
            .iter()
            .position(|word| word.token_indices.contains(&token))
    };
    let mut pairs = Vec::new();
    let mut source_used = vec![false; source.words.len()];
    let mut next_unlisted_source = 0usize;
    let removed = |index: usize| WordPair {
        source_word: Some(index),
        edit_word: None,
        source_text: source.words[index].text.clone(),
        edit_text: String::new(),
        change: WordChange::Removed,
    };
    for (edit_index, edit_word) in edit.words.iter().enumerate() {
        let matched: Option<Vec<usize>> = edit_word
            .token_indices
            .iter()
            .map(|&token| token_sources.get(token).copied().flatten())
            .collect();
        let source_index = matched.and_then(|matched| {
            let first = source_word_of(*matched.first()?)?;
            let whole_word = source.words[first].token_indices == matched;
            (whole_word && !source_used[first]).then_some(first)
        });
        match source_index {
            Some(source_index) => {
                // Source words skipped since the last pair were removed.
                let skipped_range = next_unlisted_source.min(source_index)..source_index;
                for (skipped, used) in source_used[skipped_range.clone()].iter_mut().enumerate() {
                    if !*used {
                        *used = true;
                        pairs.push(removed(skipped_range.start + skipped));
                    }
                }
                source_used[source_index] = true;
                next_unlisted_source = next_unlisted_source.max(source_index + 1);
                pairs.push(WordPair {
                    source_word: Some(source_index),
                    edit_word: Some(edit_index),
                    source_text: source.words[source_index].text.clone(),
                    edit_text: edit_word.text.clone(),
                    change: WordChange::Same,
                });
            }
            None => pairs.push(WordPair {
                source_word: None,
                edit_word: Some(edit_index),
                source_text: String::new(),
                edit_text: edit_word.text.clone(),
                change: WordChange::Added,
            }),
        }
    }
    for (index, used) in source_used.iter().enumerate() {
        if !used {
            pairs.push(removed(index));
        }
    }
    pairs
}

/// Splits a word as callers name it into its text and, optionally, which occurrence of that text
/// is meant: `"square#2"` is the second "square" of a prompt (counted from 1), `"square"` every
/// "square". Surrounding spaces are ignored; a `#` not followed by a number from 1 up is part of
/// the text.
pub fn parse_word_selector(word: &str) -> (&str, Option<usize>) {
    let word = word.trim();
    if let Some((text, number)) = word.rsplit_once('#') {
        if let Ok(occurrence @ 1..) = number.parse::<usize>() {
            if !text.trim().is_empty() {
                return (text.trim(), Some(occurrence));
            }
        }
    }
    (word, None)
}

/// Which prompts of an edit a local-blend word is looked up in: `"source:circle"` only in the
/// source prompt, `"edit:square#1"` only in the edited one, a plain selector in both. Returns
/// `(in_source, in_edit, selector)`. Needed when occurrences shift between the prompts: in "a red
/// circle and a blue square" -> "a red square and a blue square", the edited prompt's `square#1` is
/// the red square, the source's is the blue one.
pub fn split_prompt_scope(word: &str) -> (bool, bool, &str) {
    if let Some(selector) = word.strip_prefix("source:") {
        (true, false, selector)
    } else if let Some(selector) = word.strip_prefix("edit:") {
        (false, true, selector)
    } else {
        (true, true, word)
    }
}

/// The selector that names the word at `index` of `words` alone: its text, plus `#k` (its
/// occurrence, from 1) when the text occurs more than once in `words` or in `other_words` (the
/// other prompt of an edit, where a plain text would also pick the repeats).
pub fn word_selector(words: &[WordSpan], index: usize, other_words: &[WordSpan]) -> String {
    let Some(word) = words.get(index) else {
        return String::new();
    };
    let same = |span: &&WordSpan| span.text.eq_ignore_ascii_case(&word.text);
    let repeated =
        words.iter().filter(same).count() > 1 || other_words.iter().filter(same).count() > 1;
    if repeated {
        let occurrence = words[..=index].iter().filter(same).count();
        format!("{}#{occurrence}", word.text)
    } else {
        word.text.clone()
    }
}

/// Token positions of the words of `words` that `word` selects (see [`parse_word_selector`]): every
/// word whose text equals it (ignoring ASCII case), or only its k-th occurrence for `"text#k"`; in
/// prompt order, empty when the prompt has no such word.
pub fn word_token_indices(words: &[WordSpan], word: &str) -> Vec<usize> {
    selected_words(words, word)
        .into_iter()
        .flat_map(|index| words[index].token_indices.iter().copied())
        .collect()
}

/// Indices into `words` of the words that `word` selects (see [`parse_word_selector`]), in order.
pub fn selected_words(words: &[WordSpan], word: &str) -> Vec<usize> {
    let (wanted, occurrence) = parse_word_selector(word);
    words
        .iter()
        .enumerate()
        .filter(|(_, span)| span.text.eq_ignore_ascii_case(wanted))
        .enumerate()
        .filter(|(seen, _)| occurrence.is_none_or(|k| k == seen + 1))
        .map(|(_, (index, _))| index)
        .collect()
}

/// `"a", "cat"` style listing for messages.
fn word_list(words: &[WordSpan]) -> String {
    words
        .iter()
        .map(|word| format!("{:?}", word.text))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a layout from words given as their tokens, e.g. `[["a"], ["sun", "glasses"]]`:
    /// start token, the tokens, end token.
    struct Prompt {
        tokens: Vec<String>,
        words: Vec<WordSpan>,
    }

    impl Prompt {
        fn new(words: &[&[&str]]) -> Self {
            let mut tokens = vec!["<start>".to_string()];
            let mut spans = Vec::new();
            for word in words {
                let first = tokens.len();
                tokens.extend(word.iter().map(|token| token.to_string()));
                spans.push(WordSpan {
                    text: word.concat(),
                    token_indices: (first..tokens.len()).collect(),
                });
            }
            tokens.push("<end>".to_string());
            Self {
                tokens,
                words: spans,
            }
        }

        /// Adds a punctuation token (not a word) after the current tokens, before the end token.
        fn with_punctuation_after_word(mut self, word: usize, mark: &str) -> Self {
            let position = self.words[word].token_indices.last().copied().unwrap_or(0) + 1;
            self.tokens.insert(position, mark.to_string());
            for span in &mut self.words[word + 1..] {
                span.token_indices.iter_mut().for_each(|index| *index += 1);
            }
            self
        }

        fn layout(&self) -> PromptLayout<'_> {
            PromptLayout {
                tokens: &self.tokens,
                words: &self.words,
            }
        }
    }

    const LENGTH: usize = 12;

    fn assert_column(mapping: &TokenMapping, edit: usize, expected: &[(usize, f32)]) {
        assert_eq!(
            mapping.sources_of(edit),
            expected.to_vec(),
            "edited token {edit}"
        );
    }

    #[test]
    fn identical_prompts_give_the_identity() {
        let prompt = Prompt::new(&[&["a"], &["red"], &["circle"]]);
        for kind in [EditKind::Replace, EditKind::Refine] {
            let alignment =
                align_prompts(&prompt.layout(), &prompt.layout(), LENGTH, Some(kind)).unwrap();
            assert!(alignment.mapping.is_identity(), "{kind:?}");
            assert!(alignment
                .words
                .iter()
                .all(|pair| pair.change == WordChange::Same));
        }
        assert_eq!(TokenMapping::identity(LENGTH), {
            let alignment =
                align_prompts(&prompt.layout(), &prompt.layout(), LENGTH, None).unwrap();
            assert_eq!(alignment.kind, EditKind::Replace);
            alignment.mapping
        });
    }

    #[test]
    fn replace_maps_a_swapped_word_token_to_token() {
        let source = Prompt::new(&[&["a"], &["red"], &["circle"]]);
        let edit = Prompt::new(&[&["a"], &["red"], &["square"]]);
        let alignment = align_prompts(&source.layout(), &edit.layout(), LENGTH, None).unwrap();
        assert_eq!(alignment.kind, EditKind::Replace);
        assert!(alignment.mapping.is_fully_mapped());
        for position in 0..LENGTH {
            assert_column(&alignment.mapping, position, &[(position, 1.0)]);
        }
        assert_eq!(
            alignment
                .words
                .iter()
                .map(|pair| pair.change)
                .collect::<Vec<_>>(),
            vec![WordChange::Same, WordChange::Same, WordChange::Swapped]
        );
        assert_eq!(alignment.words[2].source_text, "circle");
        assert_eq!(alignment.words[2].edit_text, "square");
    }

    #[test]
    fn replace_spreads_a_word_split_into_more_tokens() {
        // "a cat wearing hat" -> "a cat wearing sun glasses": one token becomes two, 1/2 each.
        let source = Prompt::new(&[&["a"], &["cat"], &["wearing"], &["hat"]]);
        let edit = Prompt::new(&[&["a"], &["cat"], &["wearing"], &["sun", "glasses"]]);
        let mapping = replace_mapping(&source.layout(), &edit.layout(), LENGTH).unwrap();
        for position in 0..4 {
            assert_column(&mapping, position, &[(position, 1.0)]);
        }
        assert_column(&mapping, 4, &[(4, 0.5)]);
        assert_column(&mapping, 5, &[(4, 0.5)]);
        // End token and padding stay aligned with the source's (source 5 -> edit 6, ...).
        for edit_pos in 6..LENGTH {
            assert_column(&mapping, edit_pos, &[(edit_pos - 1, 1.0)]);
        }
        // The source's last padding token has no room left.
        assert!((0..LENGTH).all(|edit_pos| mapping.weight(LENGTH - 1, edit_pos) == 0.0));
    }

    #[test]
    fn replace_merges_a_word_split_into_fewer_tokens() {
        // Two source tokens into one: the edited token sums both (weight 1/1 each), keeping mass.
        let source = Prompt::new(&[&["sun", "glasses"], &["cat"]]);
        let edit = Prompt::new(&[&["hat"], &["cat"]]);
        let mapping = replace_mapping(&source.layout(), &edit.layout(), LENGTH).unwrap();
        assert_column(&mapping, 0, &[(0, 1.0)]);
        assert_column(&mapping, 1, &[(1, 1.0), (2, 1.0)]);
        assert_column(&mapping, 2, &[(3, 1.0)]);
        assert_column(&mapping, 3, &[(4, 1.0)]);
        // Two-into-three: each source token gives 1/3 to each new token.
        let three = Prompt::new(&[&["x", "y", "z"], &["cat"]]);
        let mapping = replace_mapping(&source.layout(), &three.layout(), LENGTH).unwrap();
        for edit_pos in 1..4 {
            let sources = mapping.sources_of(edit_pos);
            assert_eq!(sources.len(), 2);
            assert!(sources
                .iter()
                .all(|&(_, weight)| (weight - 1.0 / 3.0).abs() < 1e-7));
        }
        assert_column(&mapping, 4, &[(3, 1.0)]);
    }

    #[test]
    fn replace_skips_punctuation_only_one_prompt_has() {
        let source =
            Prompt::new(&[&["a"], &["cat"], &["sitting"]]).with_punctuation_after_word(1, ",");
        let edit = Prompt::new(&[&["a"], &["dog"], &["sitting"]]);
        let mapping = replace_mapping(&source.layout(), &edit.layout(), LENGTH).unwrap();
        assert_column(&mapping, 2, &[(2, 1.0)]);
        // "sitting" is source token 4 (after the comma) and edited token 3.
        assert_column(&mapping, 3, &[(4, 1.0)]);
        assert_column(&mapping, 4, &[(5, 1.0)]);
    }

    #[test]
    fn replace_needs_equal_word_counts() {
        let source = Prompt::new(&[&["a"], &["cat"]]);
        let edit = Prompt::new(&[&["a"], &["black"], &["cat"]]);
        let error = replace_mapping(&source.layout(), &edit.layout(), LENGTH).unwrap_err();
        assert!(
            error.to_string().contains("same number of words"),
            "{error}"
        );
        assert!(align_prompts(
            &source.layout(),
            &edit.layout(),
            LENGTH,
            Some(EditKind::Replace)
        )
        .is_err());
    }

    #[test]
    fn refine_inserted_words_keep_their_own_attention() {
        // "a cat" -> "a black fluffy cat"
        let source = Prompt::new(&[&["a"], &["cat"]]);
        let edit = Prompt::new(&[&["a"], &["black"], &["fluffy"], &["cat"]]);
        let alignment = align_prompts(&source.layout(), &edit.layout(), LENGTH, None).unwrap();
        assert_eq!(alignment.kind, EditKind::Refine);
        let mapping = &alignment.mapping;
        assert_eq!(
            mapping.alphas[..7],
            [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0],
            "start, a, black, fluffy, cat, end, padding"
        );
        assert_column(mapping, 0, &[(0, 1.0)]);
        assert_column(mapping, 1, &[(1, 1.0)]);
        assert_column(mapping, 2, &[]);
        assert_column(mapping, 3, &[]);
        assert_column(mapping, 4, &[(2, 1.0)]);
        assert_column(mapping, 5, &[(3, 1.0)]);
        // Padding after the end tokens: edit 6 <- source 4, ...
        for edit_pos in 6..LENGTH {
            assert_column(mapping, edit_pos, &[(edit_pos - 2, 1.0)]);
        }
        let changes: Vec<(WordChange, &str)> = alignment
            .words
            .iter()
            .map(|pair| (pair.change, pair.edit_text.as_str()))
            .collect();
        assert_eq!(
            changes,
            vec![
                (WordChange::Same, "a"),
                (WordChange::Added, "black"),
                (WordChange::Added, "fluffy"),
                (WordChange::Same, "cat"),
            ]
        );
    }

    #[test]
    fn refine_deleted_words_are_dropped_and_listed_in_place() {
        // "a red circle on a blue background" -> "a circle on a background"
        let source = Prompt::new(&[
            &["a"],
            &["red"],
            &["circle"],
            &["on"],
            &["a"],
            &["blue"],
            &["background"],
        ]);
        let edit = Prompt::new(&[&["a"], &["circle"], &["on"], &["a"], &["background"]]);
        let alignment = align_prompts(&source.layout(), &edit.layout(), LENGTH, None).unwrap();
        assert_eq!(alignment.kind, EditKind::Refine);
        let mapping = &alignment.mapping;
        let expected_sources = [0, 1, 3, 4, 5, 7, 8];
        for (edit_pos, &source_pos) in expected_sources.iter().enumerate() {
            assert_column(mapping, edit_pos, &[(source_pos, 1.0)]);
        }
        // Padding: edit 7 <- source 9, ..., edit 9 <- source 11; the last two have no source.
        assert_column(mapping, 7, &[(9, 1.0)]);
        assert_column(mapping, 9, &[(11, 1.0)]);
        assert_eq!(mapping.alphas[10..], [0.0, 0.0]);
        let listing: Vec<(WordChange, &str, &str)> = alignment
            .words
            .iter()
            .map(|pair| {
                (
                    pair.change,
                    pair.source_text.as_str(),
                    pair.edit_text.as_str(),
                )
            })
            .collect();
        assert_eq!(
            listing,
            vec![
                (WordChange::Same, "a", "a"),
                (WordChange::Removed, "red", ""),
                (WordChange::Same, "circle", "circle"),
                (WordChange::Same, "on", "on"),
                (WordChange::Same, "a", "a"),
                (WordChange::Removed, "blue", ""),
                (WordChange::Same, "background", "background"),
            ]
        );
    }

    #[test]
    fn refine_with_a_split_word_and_a_substitution() {
        // "a cat" -> "a sun glasses dog": "cat" removed, the new word's tokens added.
        let source = Prompt::new(&[&["a"], &["cat"]]);
        let edit = Prompt::new(&[&["a"], &["sun", "glasses"], &["dog"]]);
        let alignment = align_prompts(&source.layout(), &edit.layout(), LENGTH, None).unwrap();
        assert_eq!(
            alignment.mapping.alphas[..6],
            [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
        );
        assert_column(&alignment.mapping, 5, &[(3, 1.0)]);
        let changes: Vec<WordChange> = alignment.words.iter().map(|pair| pair.change).collect();
        assert_eq!(
            changes,
            vec![
                WordChange::Same,
                WordChange::Added,
                WordChange::Added,
                WordChange::Removed
            ]
        );
    }

    #[test]
    fn token_alignment_prefers_gaps_like_the_reference() {
        let tokens = |text: &str| -> Vec<String> { text.split(' ').map(String::from).collect() };
        // Mismatches never pair (a gap scores 0, a mismatch -1).
        assert_eq!(
            align_tokens(&tokens("s a cat e"), &tokens("s a dog e")),
            vec![Some(0), Some(1), None, Some(3)]
        );
        // Repeated tokens: at equal scores the trace back skips the later source token.
        assert_eq!(
            align_tokens(&tokens("s a a e"), &tokens("s a e")),
            vec![Some(0), Some(1), Some(3)]
        );
        assert_eq!(align_tokens(&tokens(""), &tokens("x")), vec![None]);
    }

    #[test]
    fn word_lookup_is_case_insensitive_and_finds_every_occurrence() {
        let prompt = Prompt::new(&[&["a"], &["cat"], &["and"], &["a"], &["sun", "glasses"]]);
        assert_eq!(word_token_indices(&prompt.words, " A "), vec![1, 4]);
        assert_eq!(word_token_indices(&prompt.words, "sunglasses"), vec![5, 6]);
        assert!(word_token_indices(&prompt.words, "dog").is_empty());
    }

    #[test]
    fn word_selectors_pick_one_occurrence() {
        let prompt = Prompt::new(&[&["a"], &["red"], &["square"], &["and"], &["a"], &["square"]]);
        assert_eq!(word_token_indices(&prompt.words, "square#2"), vec![6]);
        assert_eq!(word_token_indices(&prompt.words, " Square#1 "), vec![3]);
        assert!(word_token_indices(&prompt.words, "square#3").is_empty());
        assert_eq!(word_token_indices(&prompt.words, "square"), vec![3, 6]);
        assert_eq!(selected_words(&prompt.words, "square#2"), vec![5]);
        assert_eq!(parse_word_selector("c#"), ("c#", None));
        assert_eq!(parse_word_selector("#2"), ("#2", None));
        assert_eq!(parse_word_selector("x#0"), ("x#0", None));
        let single = Prompt::new(&[&["a"], &["square"]]);
        assert_eq!(word_selector(&prompt.words, 5, &single.words), "square#2");
        assert_eq!(word_selector(&prompt.words, 1, &single.words), "red");
        // Unique here but repeated in the other prompt: still numbered.
        assert_eq!(word_selector(&single.words, 1, &prompt.words), "square#1");
    }
}

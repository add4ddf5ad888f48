//! AUTOMATIC1111's prompt syntax, parsed to plain data: word weights and prompt swaps.
//!
//! | syntax | meaning |
//! |---|---|
//! | `(text)` | weight x1.1; nested groups multiply: `((text))` is x1.21 |
//! | `(text:1.3)` | weight x1.3 (times the weights of the enclosing groups) |
//! | `[text]` | weight /1.1 |
//! | `\(` `\)` `\[` `\]` `\:` `\\` | the character itself |
//! | `[from:to:when]` | `from` until the switch, `to` after it |
//! | `[to:when]`, `[from::when]` | add `to` / remove `from` at the switch |
//!
//! `when` is a fraction of the steps in `(0, 1)` or a whole step number (`>= 1`).
//!
//! A prompt with swaps describes two prompts: the **source** (every swap's `from`) and the **edited**
//! prompt (every swap's `to`). attend runs it as a Prompt-to-Prompt edit: the source prompt is
//! denoised alongside, and the edited prompt's cross-attention is the source's for the steps before
//! the switch (`[0, when)`), its own after it ([`ParsedPrompt::edit_windows`]). The image shown is
//! the edited one. A1111 instead conditions on the `from` text before the switch and on `to` after.
//!
//! Weights are not applied to the text embedding (A1111 scales the embedding of the weighted tokens
//! and restores its mean): they scale the cross-attention probabilities of the weighted tokens in
//! the conditional half, as attend's reweighting does (see `crate::attention::prompt_weights`).

use std::ops::Range;

use crate::analysis::edit_spec::{CrossWindow, StepWindow};
use crate::analysis::{AnalysisError, AnalysisResult};

/// Weight of one level of `( )`.
pub const ROUND_BRACKET_WEIGHT: f32 = 1.1;
/// Weight of one level of `[ ]`.
pub const SQUARE_BRACKET_WEIGHT: f32 = 1.0 / 1.1;

/// When a `[from:to:when]` swap switches from `from` to `to`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SwitchAt {
    /// A fraction of the steps, in `(0, 1)`.
    Fraction(f64),
    /// A step number (`>= 1`): steps `0..n` use `from`.
    Step(usize),
}

impl SwitchAt {
    /// The number of steps (of `step_count`) that use `from`: `floor(fraction * N)` or the step
    /// number, at most `N`.
    pub fn steps_before(&self, step_count: usize) -> usize {
        match *self {
            Self::Fraction(fraction) => (fraction * step_count as f64).floor() as usize,
            Self::Step(step) => step,
        }
        .min(step_count)
    }

    /// The cross-attention window `[0, when)` of a run of `step_count` steps, chosen so that
    /// [`StepWindow::cross_steps`] covers exactly the first [`SwitchAt::steps_before`] steps.
    pub fn cross_window(&self, step_count: usize) -> StepWindow {
        let steps = self.steps_before(step_count);
        // `cross_steps` takes floor(end * (N + 1)); the half step keeps it off the boundary.
        StepWindow::until((steps as f64 + 0.5) / (step_count as f64 + 1.0))
    }
}

/// A part of a prompt's plain text with a weight other than 1.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightedRange {
    /// Byte range into [`PlainPrompt::text`].
    pub bytes: Range<usize>,
    /// The weight (product of the enclosing groups' weights).
    pub weight: f32,
}

/// One prompt with the syntax taken out: the text the tokenizer sees and its weighted parts.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PlainPrompt {
    /// The text without brackets, weights and escapes.
    pub text: String,
    /// The parts of `text` whose weight is not 1, in text order, not overlapping.
    pub weighted: Vec<WeightedRange>,
}

impl PlainPrompt {
    /// The weight of the text at byte `offset` (1 outside every weighted range).
    pub fn weight_at(&self, offset: usize) -> f32 {
        self.weighted
            .iter()
            .find(|range| range.bytes.contains(&offset))
            .map_or(1.0, |range| range.weight)
    }

    /// The prompt written back in the syntax: weighted parts as `(text:weight)`, the special
    /// characters escaped. Parsing it gives this prompt again (weights rounded to 6 decimals).
    pub fn to_syntax(&self) -> String {
        let mut out = String::with_capacity(self.text.len() + 8 * self.weighted.len());
        let mut position = 0;
        for range in &self.weighted {
            escape_into(&mut out, &self.text[position..range.bytes.start]);
            out.push('(');
            escape_into(&mut out, &self.text[range.bytes.clone()]);
            out.push_str(&format!(":{})", format_weight(range.weight)));
            position = range.bytes.end;
        }
        escape_into(&mut out, &self.text[position..]);
        out
    }
}

impl PlainPrompt {
    /// The weight of each word of `words` (tokenizer words, in prompt order, lower-cased as the
    /// tokenizer normalises them), found by searching the text in order; a word not found gets 1.
    pub fn word_weights(&self, words: &[crate::analysis::WordSpan]) -> Vec<f32> {
        // The lower-cased text, with the byte offset in `text` of every lower-cased byte.
        let mut lowered = String::with_capacity(self.text.len());
        let mut origin = Vec::with_capacity(self.text.len());
        for (offset, character) in self.text.char_indices() {
            for lower in character.to_lowercase() {
                lowered.push(lower);
                origin.resize(lowered.len(), offset);
            }
        }
        let mut cursor = 0;
        words
            .iter()
            .map(|word| {
                let wanted = word.text.to_lowercase();
                match lowered.get(cursor..).and_then(|rest| rest.find(&wanted)) {
                    Some(found) if !wanted.is_empty() => {
                        let start = cursor + found;
                        cursor = start + wanted.len();
                        self.weight_at(origin[start])
                    }
                    _ => 1.0,
                }
            })
            .collect()
    }
}

/// A `[from:to:when]` swap.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptSwap {
    /// The source prompt's text (plain, may be empty).
    pub from: String,
    /// The edited prompt's text (plain, may be empty).
    pub to: String,
    /// When `to` takes over.
    pub when: SwitchAt,
    /// Byte range of `to` in the edited prompt's plain text.
    pub edited_bytes: Range<usize>,
    /// 1-based position of the `[` in the prompt, in characters.
    pub column: usize,
}

/// A parsed prompt: its source and edited prompts (the same when there is no swap) and its swaps.
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedPrompt {
    /// The prompt with every swap's `from`.
    pub source: PlainPrompt,
    /// The prompt with every swap's `to`.
    pub edited: PlainPrompt,
    /// The swaps in prompt order.
    pub swaps: Vec<PromptSwap>,
}

impl ParsedPrompt {
    /// True when the prompt has a `[from:to:when]` swap.
    pub fn has_swaps(&self) -> bool {
        !self.swaps.is_empty()
    }

    /// True when some text has a weight other than 1.
    pub fn has_weights(&self) -> bool {
        !self.source.weighted.is_empty() || !self.edited.weighted.is_empty()
    }

    /// The Prompt-to-Prompt cross-attention windows of the swaps in a run of `step_count` steps:
    /// each swap's `to` words (named `word#k` by their occurrence in the edited prompt) get
    /// `[0, when)`; every other token gets `[0, latest when)`, so that after the last switch the
    /// edited prompt attends with its own attention everywhere. `None` without swaps.
    pub fn edit_windows(&self, step_count: usize) -> Option<CrossWindow> {
        let latest = self
            .swaps
            .iter()
            .map(|swap| swap.when.steps_before(step_count))
            .max()?;
        let default = SwitchAt::Step(latest).cross_window(step_count);
        let mut per_word = Vec::new();
        for swap in &self.swaps {
            let before = &self.edited.text[..swap.edited_bytes.start];
            let to_words: Vec<String> = crate::analysis::plain_words(&swap.to).collect();
            for (index, word) in to_words.iter().enumerate() {
                let occurrence = crate::analysis::plain_words(before)
                    .filter(|other| other == word)
                    .count()
                    + to_words[..index]
                        .iter()
                        .filter(|other| *other == word)
                        .count()
                    + 1;
                per_word.push((
                    format!("{word}#{occurrence}"),
                    swap.when.cross_window(step_count),
                ));
            }
        }
        Some(CrossWindow { default, per_word })
    }
}

/// Parses `prompt`; errors name what is wrong and its column (`unclosed ( at column 14`).
pub fn parse_prompt(prompt: &str) -> AnalysisResult<ParsedPrompt> {
    let chars: Vec<char> = prompt.chars().collect();
    let matches = match_brackets(prompt, &chars)?;
    let mut parser = Parser {
        prompt,
        chars: &chars,
        matches: &matches,
        source: Vec::new(),
        edited: Vec::new(),
        swaps: Vec::new(),
    };
    parser.parse_range(0, chars.len(), Target::Both, 1.0)?;
    let source = plain_prompt(&parser.source);
    let edited = plain_prompt(&parser.edited);
    Ok(ParsedPrompt {
        source,
        edited,
        swaps: parser.swaps,
    })
}

/// Which prompt(s) text goes to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Both,
    Source,
    Edited,
}

struct Parser<'a> {
    prompt: &'a str,
    chars: &'a [char],
    /// For every `(` and `[` (by char index), the index of its closing bracket.
    matches: &'a [Option<usize>],
    source: Vec<(char, f32)>,
    edited: Vec<(char, f32)>,
    swaps: Vec<PromptSwap>,
}

impl Parser<'_> {
    fn push(&mut self, target: Target, character: char, weight: f32) {
        if target != Target::Edited {
            self.source.push((character, weight));
        }
        if target != Target::Source {
            self.edited.push((character, weight));
        }
    }

    /// Parses `chars[start..end]` into `target` with the enclosing weight `weight`.
    fn parse_range(
        &mut self,
        start: usize,
        end: usize,
        target: Target,
        weight: f32,
    ) -> AnalysisResult<()> {
        let mut index = start;
        while index < end {
            let character = self.chars[index];
            match character {
                '\\' => {
                    match self.chars.get(index + 1) {
                        Some(&next) if index + 1 < end && "()[]:\\".contains(next) => {
                            self.push(target, next, weight);
                            index += 2;
                        }
                        _ => {
                            self.push(target, '\\', weight);
                            index += 1;
                        }
                    }
                    continue;
                }
                '(' => {
                    let close = self.close_of(index)?;
                    let (content_end, group_weight) = self.round_weight(index, close)?;
                    self.parse_range(index + 1, content_end, target, weight * group_weight)?;
                    index = close + 1;
                }
                '[' => {
                    let close = self.close_of(index)?;
                    let colons = self.top_level_colons(index + 1, close);
                    if colons.is_empty() {
                        self.parse_range(index + 1, close, target, weight * SQUARE_BRACKET_WEIGHT)?;
                    } else {
                        self.parse_swap(index, close, &colons, target, weight)?;
                    }
                    index = close + 1;
                }
                ')' | ']' => {
                    // Every bracket was matched beforehand, so this cannot happen; keep it literal.
                    self.push(target, character, weight);
                    index += 1;
                }
                _ => {
                    self.push(target, character, weight);
                    index += 1;
                }
            }
        }
        Ok(())
    }

    fn close_of(&self, open: usize) -> AnalysisResult<usize> {
        self.matches[open].ok_or_else(|| {
            syntax_error(format!(
                "unclosed `{}` at {}",
                self.chars[open],
                position(self.prompt, self.chars, open)
            ))
        })
    }

    /// The content end and weight of the `(` group `open..close`: `(text:1.3)` gives the colon's
    /// index and 1.3, `(text)` gives `close` and 1.1.
    fn round_weight(&self, open: usize, close: usize) -> AnalysisResult<(usize, f32)> {
        let Some(&colon) = self.top_level_colons(open + 1, close).last() else {
            return Ok((close, ROUND_BRACKET_WEIGHT));
        };
        let text: String = self.chars[colon + 1..close].iter().collect();
        let trimmed = text.trim();
        let looks_numeric = trimmed
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit() || "+-.".contains(c));
        if !looks_numeric {
            // `(photo: portrait)`: the colon is text.
            return Ok((close, ROUND_BRACKET_WEIGHT));
        }
        match trimmed.parse::<f32>() {
            Ok(value) if value.is_finite() => Ok((colon, value)),
            _ => Err(syntax_error(format!(
                "bad weight `{trimmed}` at {} (expected a number such as 1.3)",
                position(self.prompt, self.chars, colon + 1)
            ))),
        }
    }

    /// Indices of the unescaped `:` in `start..end` outside nested brackets.
    fn top_level_colons(&self, start: usize, end: usize) -> Vec<usize> {
        let mut colons = Vec::new();
        let mut index = start;
        while index < end {
            match self.chars[index] {
                '\\' => index += 1,
                '(' | '[' => {
                    if let Some(close) = self.matches[index] {
                        index = close;
                    }
                }
                ':' => colons.push(index),
                _ => {}
            }
            index += 1;
        }
        colons
    }

    fn parse_swap(
        &mut self,
        open: usize,
        close: usize,
        colons: &[usize],
        target: Target,
        weight: f32,
    ) -> AnalysisResult<()> {
        let at = position(self.prompt, self.chars, open);
        if target != Target::Both {
            return Err(syntax_error(format!(
                "a `[from:to:when]` swap inside another one at {at}"
            )));
        }
        let (from_range, to_range, when_start) = match *colons {
            [when_colon] => (open + 1..open + 1, open + 1..when_colon, when_colon + 1),
            [to_colon, when_colon] => {
                (open + 1..to_colon, to_colon + 1..when_colon, when_colon + 1)
            }
            _ => {
                return Err(syntax_error(format!(
                    "`[` at {at} has {} `:`; a swap is `[from:to:when]`, `[to:when]` or \
                     `[from::when]`",
                    colons.len()
                )))
            }
        };
        let when_text: String = self.chars[when_start..close].iter().collect();
        let when = parse_when(when_text.trim()).map_err(|reason| {
            syntax_error(format!(
                "bad switch `{}` of the swap at {at}: {reason}",
                when_text.trim()
            ))
        })?;
        let from_start = self.source.len();
        self.parse_range(from_range.start, from_range.end, Target::Source, weight)?;
        let from: String = self.source[from_start..].iter().map(|(c, _)| c).collect();
        let to_start = self.edited.len();
        self.parse_range(to_range.start, to_range.end, Target::Edited, weight)?;
        let to: String = self.edited[to_start..].iter().map(|(c, _)| c).collect();
        let byte_start: usize = self.edited[..to_start]
            .iter()
            .map(|(c, _)| c.len_utf8())
            .sum();
        self.swaps.push(PromptSwap {
            edited_bytes: byte_start..byte_start + to.len(),
            from,
            to,
            when,
            column: open + 1,
        });
        Ok(())
    }
}

/// `when` of a swap: a fraction in `(0, 1)` or a whole step `>= 1`.
fn parse_when(text: &str) -> Result<SwitchAt, String> {
    let value: f64 = text
        .parse()
        .map_err(|_| "expected a fraction of the steps in (0, 1) or a step number".to_string())?;
    if value > 0.0 && value < 1.0 {
        Ok(SwitchAt::Fraction(value))
    } else if value >= 1.0 && value.fract() == 0.0 && value <= u32::MAX as f64 {
        Ok(SwitchAt::Step(value as usize))
    } else {
        Err("expected a fraction of the steps in (0, 1) or a whole step number >= 1".to_string())
    }
}

/// Pairs every unescaped `(` / `[` with its closing bracket; an unmatched or mismatched bracket is
/// an error naming its column.
fn match_brackets(prompt: &str, chars: &[char]) -> AnalysisResult<Vec<Option<usize>>> {
    let mut matches = vec![None; chars.len()];
    let mut open: Vec<usize> = Vec::new();
    let mut index = 0;
    while index < chars.len() {
        match chars[index] {
            '\\' => index += 1,
            '(' | '[' => open.push(index),
            close @ (')' | ']') => {
                let wanted = if close == ')' { '(' } else { '[' };
                match open.pop() {
                    Some(start) if chars[start] == wanted => matches[start] = Some(index),
                    Some(start) => {
                        return Err(syntax_error(format!(
                            "`{close}` at {} does not close the `{}` at {}",
                            position(prompt, chars, index),
                            chars[start],
                            position(prompt, chars, start)
                        )))
                    }
                    None => {
                        return Err(syntax_error(format!(
                            "unmatched `{close}` at {} (write `\\{close}` for the character)",
                            position(prompt, chars, index)
                        )))
                    }
                }
            }
            _ => {}
        }
        index += 1;
    }
    if let Some(&start) = open.last() {
        return Err(syntax_error(format!(
            "unclosed `{}` at {}",
            chars[start],
            position(prompt, chars, start)
        )));
    }
    Ok(matches)
}

/// "column C" (1-based, in characters), or "line L, column C" for a prompt of several lines.
fn position(prompt: &str, chars: &[char], index: usize) -> String {
    if !prompt.contains('\n') {
        return format!("column {}", index + 1);
    }
    let before = &chars[..index];
    let line = before.iter().filter(|&&c| c == '\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&c| c == '\n')
        .map_or(0, |newline| newline + 1);
    format!("line {line}, column {}", index - line_start + 1)
}

fn syntax_error(reason: String) -> AnalysisError {
    AnalysisError::InvalidArgument {
        name: "prompt",
        reason,
    }
}

/// Characters with their weights -> text and merged weighted ranges.
fn plain_prompt(characters: &[(char, f32)]) -> PlainPrompt {
    let mut prompt = PlainPrompt::default();
    for &(character, weight) in characters {
        let start = prompt.text.len();
        prompt.text.push(character);
        let end = prompt.text.len();
        if weight == 1.0 {
            continue;
        }
        match prompt.weighted.last_mut() {
            Some(last) if last.bytes.end == start && last.weight == weight => last.bytes.end = end,
            _ => prompt.weighted.push(WeightedRange {
                bytes: start..end,
                weight,
            }),
        }
    }
    prompt
}

fn escape_into(out: &mut String, text: &str) {
    for character in text.chars() {
        if "()[]:\\".contains(character) {
            out.push('\\');
        }
        out.push(character);
    }
}

/// A weight with at most 6 decimals, trailing zeros dropped (`1.21`, `0.909091`, `2`).
pub fn format_weight(weight: f32) -> String {
    let text = format!("{weight:.6}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    text.to_string()
}

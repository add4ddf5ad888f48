//! Prompt tokenizer: text -> CLIP token ids, plus which tokens belong to which typed word.
//!
//! Loads a diffusers `tokenizer/` folder. With `tokenizer.json` the file is used as-is (CLIP BPE or
//! any tokenizers-crate model such as a small word-level vocabulary); without it a CLIP BPE
//! tokenizer is built from `vocab.json` + `merges.txt` the way transformers' `CLIPConverter` does.
//! Either way the content ids come from the tokenizers crate without special tokens, and the start,
//! end and pad tokens named in `tokenizer_config.json` are added here, so both kinds share one path.

use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, Encoding, NormalizedString, Normalizer as _, PreTokenizerWrapper,
    SplitDelimiterBehavior, Tokenizer,
};

use crate::analysis::prompt_syntax::{parse_prompt, PlainPrompt};
use crate::analysis::WordSpan;
use crate::pipeline::{PipelineError, PipelineResult};

/// CLIP's pre-tokenisation pattern (from the original CLIP `SimpleTokenizer`).
const CLIP_SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// CLIP's start-of-text token, used when `tokenizer_config.json` names no `bos_token`.
const DEFAULT_START_TOKEN: &str = "<|startoftext|>";
/// CLIP's end-of-text token, used when `tokenizer_config.json` names no `eos_token`.
const DEFAULT_END_TOKEN: &str = "<|endoftext|>";
/// Where the bundled CLIP vocabulary lives in the source tree (named in errors).
const BUNDLED_CLIP_FOLDER: &str = "assets/clip-tokenizer";
/// The bundled CLIP vocabulary (`vocab.json`), compiled in so one checkpoint file is enough.
const BUNDLED_CLIP_VOCAB: &str = include_str!("../../assets/clip-tokenizer/vocab.json");
/// The bundled CLIP merges (`merges.txt`).
const BUNDLED_CLIP_MERGES: &str = include_str!("../../assets/clip-tokenizer/merges.txt");
/// CLIP's context length, used when `tokenizer_config.json` gives no usable `model_max_length`.
const DEFAULT_MAX_LENGTH: usize = 77;
/// Most chunks of `max_length` tokens a prompt is encoded to by [`PromptTokenizer::encode_prompt`]
/// (225 content tokens for CLIP); longer prompts are cut with a warning.
pub const MAX_PROMPT_CHUNKS: usize = 3;
/// Larger `model_max_length` values are transformers' "unset" sentinel (`int(1e30)`), not a length.
const LARGEST_PLAUSIBLE_MAX_LENGTH: usize = 1 << 16;

/// A special token and its id in the vocabulary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecialToken {
    /// The token string, e.g. `<|endoftext|>`.
    pub text: String,
    /// Its id.
    pub id: u32,
}

/// A prompt encoded for the text encoder: one or more chunks of `max_length` ids, each chunk
/// `[start, up to max_length - 2 content tokens, end, pad...]` (A1111's and compel's rule for
/// prompts beyond 77 tokens). Chunk `c`'s content token `j` sits at position
/// `c * max_length + 1 + j` of the concatenated sequence, which word spans and attention maps index.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptTokens {
    /// `[chunk_count * max_length]` ids.
    pub ids: Vec<u32>,
    /// The tokens as the tokenizer spells them (`"cat</w>"` for CLIP BPE), from position 0 to the
    /// last chunk's end token: `tokens[i]` is the token at position `i` of `ids`. Every chunk but
    /// the last is full (no padding), so only the last chunk's padding is left out.
    pub tokens: Vec<String>,
    /// One span per prompt word that kept at least one token, in prompt order; punctuation-only
    /// words are left out. Indices point into `ids` (start token = 0); a word cut by a chunk
    /// boundary has tokens in both chunks.
    pub words: Vec<WordSpan>,
    /// Number of `max_length` chunks in `ids` (1 for prompts of at most `max_length - 2` tokens).
    pub chunk_count: usize,
    /// Per position of `ids`: the prompt-syntax weight of the token (1 for unweighted tokens,
    /// start, end and pad tokens).
    pub weights: Vec<f32>,
    /// The prompt's full token count (start and end included) when it was cut to `max_length`.
    pub truncated_from: Option<usize>,
    /// Words (as typed, normalised) that lost some or all of their tokens to truncation,
    /// punctuation-only words left out. Empty when nothing was cut.
    pub dropped_words: Vec<String>,
}

impl PromptTokens {
    /// Number of real tokens (start, content, end), i.e. the position of the first pad token.
    pub fn token_count(&self) -> usize {
        self.tokens.len()
    }

    /// The weight of each of [`PromptTokens::words`] (that of its first token).
    pub fn word_weights(&self) -> Vec<f32> {
        self.words
            .iter()
            .map(|word| {
                word.token_indices
                    .first()
                    .and_then(|&index| self.weights.get(index))
                    .copied()
                    .unwrap_or(1.0)
            })
            .collect()
    }

    /// True when some token has a weight other than 1.
    pub fn has_weights(&self) -> bool {
        self.weights.iter().any(|&weight| weight != 1.0)
    }

    /// A message for the UI when the prompt was truncated, `None` otherwise.
    pub fn warning(&self) -> Option<String> {
        let original_count = self.truncated_from?;
        let mut message = if self.chunk_count > 1 {
            format!(
                "prompt truncated to {} chunks of {} tokens, the most attend encodes (it has {} \
                 tokens)",
                self.chunk_count,
                self.ids.len() / self.chunk_count,
                original_count
            )
        } else {
            format!(
                "prompt truncated to {} tokens (it has {original_count})",
                self.ids.len()
            )
        };
        if !self.dropped_words.is_empty() {
            message.push_str("; dropped: ");
            message.push_str(&self.dropped_words.join(" "));
        }
        Some(message)
    }
}

/// Text -> token ids for one model, loaded from its `tokenizer/` folder.
#[derive(Clone, Debug)]
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    start_token: SpecialToken,
    end_token: SpecialToken,
    pad_token: SpecialToken,
    max_length: usize,
}

impl PromptTokenizer {
    /// Loads a diffusers `tokenizer/` folder: `tokenizer.json` when present, otherwise
    /// `vocab.json` and `merges.txt` (CLIP BPE). The optional `tokenizer_config.json` gives the
    /// special tokens and `model_max_length`.
    pub fn from_folder(dir: &Path) -> PipelineResult<Self> {
        if !dir.is_dir() {
            return Err(PipelineError::Missing {
                what: "tokenizer folder",
                path: dir.to_path_buf(),
            });
        }
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.is_file() {
            TokenizerConfig::from_file(&config_path)?
        } else {
            TokenizerConfig::default()
        };
        let start_text = config
            .bos_token
            .unwrap_or_else(|| DEFAULT_START_TOKEN.into());
        let end_text = config.eos_token.unwrap_or_else(|| DEFAULT_END_TOKEN.into());
        let pad_text = config.pad_token.unwrap_or_else(|| end_text.clone());

        let json_path = dir.join("tokenizer.json");
        let tokenizer = if json_path.is_file() {
            Tokenizer::from_file(&json_path).map_err(|error| PipelineError::BadFile {
                path: json_path.clone(),
                reason: error.to_string(),
            })?
        } else {
            let special_texts = [&start_text, &end_text, &pad_text]
                .into_iter()
                .chain(config.unk_token.as_ref());
            let mut special_tokens: Vec<AddedToken> = Vec::new();
            for text in special_texts {
                if special_tokens.iter().all(|token| token.content != *text) {
                    special_tokens.push(AddedToken::from(text.clone(), true));
                }
            }
            build_clip_bpe(dir, config.unk_token.as_deref(), &special_tokens)?
        };
        let config_file = if config_path.is_file() {
            config_path
        } else {
            json_path
        };
        let lookup = |text: String, key: &str| -> PipelineResult<SpecialToken> {
            match tokenizer.token_to_id(&text) {
                Some(id) => Ok(SpecialToken { text, id }),
                None => Err(PipelineError::BadConfig {
                    path: config_file.clone(),
                    reason: format!("{key} {text:?} is not in the tokenizer's vocabulary"),
                }),
            }
        };
        let start_token = lookup(start_text, "bos_token")?;
        let end_token = lookup(end_text, "eos_token")?;
        let pad_token = lookup(pad_text, "pad_token")?;
        Ok(Self {
            tokenizer,
            start_token,
            end_token,
            pad_token,
            max_length: config.max_length,
        })
    }

    /// The CLIP BPE tokenizer shipped with attend (`assets/clip-tokenizer/`, the vocabulary every
    /// SD 1.x/2.x model uses), for single-file checkpoints that carry none: start and end tokens
    /// `<|startoftext|>` / `<|endoftext|>`, 77 tokens, and `pad_token` after the end (`<|endoftext|>`
    /// for SD 1.x, `!` for SD 2.x).
    pub fn bundled_clip(pad_token: &str) -> PipelineResult<Self> {
        let bundled = Path::new(BUNDLED_CLIP_FOLDER);
        let bad = |reason: String| PipelineError::BadFile {
            path: bundled.to_path_buf(),
            reason,
        };
        let vocab: std::collections::HashMap<String, u32> =
            serde_json::from_str(BUNDLED_CLIP_VOCAB)
                .map_err(|error| bad(format!("vocab.json: {error}")))?;
        let merges = BUNDLED_CLIP_MERGES
            .lines()
            .filter(|line| !line.starts_with("#version") && !line.trim().is_empty())
            .map(|line| {
                line.split_once(' ')
                    .map(|(left, right)| (left.to_string(), right.to_string()))
                    .ok_or_else(|| bad(format!("merges.txt: bad line {line:?}")))
            })
            .collect::<PipelineResult<Vec<_>>>()?;
        let model = BPE::builder()
            .vocab_and_merges(
                vocab
                    .into_iter()
                    .collect::<tokenizers::models::bpe::Vocab>(),
                merges,
            )
            .end_of_word_suffix("</w>".into())
            .unk_token(DEFAULT_END_TOKEN.into())
            .build()
            .map_err(|error| bad(format!("cannot build BPE: {error}")))?;
        let special_tokens: Vec<AddedToken> = [DEFAULT_START_TOKEN, DEFAULT_END_TOKEN, pad_token]
            .iter()
            .enumerate()
            .filter(|(index, text)| *index < 2 || **text != DEFAULT_END_TOKEN)
            .map(|(_, text)| AddedToken::from(text.to_string(), true))
            .collect();
        let tokenizer = clip_tokenizer_from_model(model, bundled, &special_tokens)?;
        let lookup = |text: &str| -> PipelineResult<SpecialToken> {
            tokenizer
                .token_to_id(text)
                .map(|id| SpecialToken {
                    text: text.to_string(),
                    id,
                })
                .ok_or_else(|| bad(format!("special token {text:?} is not in the vocabulary")))
        };
        Ok(Self {
            start_token: lookup(DEFAULT_START_TOKEN)?,
            end_token: lookup(DEFAULT_END_TOKEN)?,
            pad_token: lookup(pad_token)?,
            tokenizer,
            max_length: DEFAULT_MAX_LENGTH,
        })
    }

    /// Length of every encoded sequence (`model_max_length`, 77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The start-of-text token put at position 0.
    pub fn start_token(&self) -> &SpecialToken {
        &self.start_token
    }

    /// The end-of-text token put after the content tokens.
    pub fn end_token(&self) -> &SpecialToken {
        &self.end_token
    }

    /// The token that fills the sequence after the end token.
    pub fn pad_token(&self) -> &SpecialToken {
        &self.pad_token
    }

    /// Encodes a prompt to exactly `max_length` ids: start token, the first `max_length - 2`
    /// content tokens, end token, padding. The text is taken as it is (no prompt syntax), as
    /// transformers' tokenizer does. An empty prompt is valid. Unknown words become the model's
    /// unknown token (never an error).
    pub fn encode(&self, prompt: &str) -> PipelineResult<PromptTokens> {
        self.encode_chunks(
            &PlainPrompt {
                text: prompt.to_string(),
                weighted: Vec::new(),
            },
            1,
        )
    }

    /// Encodes a prompt written in A1111's syntax ([`crate::analysis::prompt_syntax`]): weights
    /// go to [`PromptTokens::weights`], a `[from:to:when]` swap takes its `from` (the source
    /// prompt), and a prompt beyond `max_length - 2` tokens is split into chunks of that many
    /// content tokens (at most [`MAX_PROMPT_CHUNKS`], longer prompts are cut with a warning). A
    /// prompt without syntax of at most `max_length - 2` tokens encodes as [`Self::encode`] does.
    /// A syntax error names its column.
    pub fn encode_prompt(&self, prompt: &str) -> PipelineResult<PromptTokens> {
        let parsed = parse_prompt(prompt)?;
        self.encode_chunks(&parsed.source, MAX_PROMPT_CHUNKS)
    }

    /// [`Self::encode_prompt`] padded with empty chunks to `like`'s chunk count, so that both share
    /// one key count (the edited prompt of a Prompt-to-Prompt edit and its source). A prompt with
    /// more chunks than `like` is an error.
    pub fn encode_prompt_like(
        &self,
        prompt: &str,
        like: &PromptTokens,
    ) -> PipelineResult<PromptTokens> {
        let mut tokens = self.encode_prompt(prompt)?;
        if tokens.chunk_count > like.chunk_count {
            return Err(PipelineError::InvalidArgument {
                name: "edit prompt",
                reason: format!(
                    "it needs {} chunks of {} tokens, its source prompt {}: an edited prompt may \
                     not be longer in chunks than its source",
                    tokens.chunk_count,
                    self.max_length - 2,
                    like.chunk_count
                ),
            });
        }
        self.pad_to_chunks(&mut tokens, like.chunk_count);
        Ok(tokens)
    }

    /// Appends empty chunks (`[start, end, pad...]`, the encoding of an empty prompt, as A1111 pads
    /// the shorter half of classifier-free guidance) until `tokens` has `chunk_count` chunks; the
    /// padding chunks add no tokens to `tokens.tokens` or words.
    pub fn pad_to_chunks(&self, tokens: &mut PromptTokens, chunk_count: usize) {
        while tokens.chunk_count < chunk_count {
            tokens.ids.push(self.start_token.id);
            tokens.ids.push(self.end_token.id);
            tokens.ids.resize(
                (tokens.chunk_count + 1) * self.max_length,
                self.pad_token.id,
            );
            tokens
                .weights
                .resize((tokens.chunk_count + 1) * self.max_length, 1.0);
            tokens.chunk_count += 1;
        }
    }

    /// Encodes `prompt.text` to at most `max_chunks` chunks (see [`PromptTokens`]).
    fn encode_chunks(
        &self,
        prompt: &PlainPrompt,
        max_chunks: usize,
    ) -> PipelineResult<PromptTokens> {
        let text = prompt.text.as_str();
        let encoding =
            self.tokenizer
                .encode(text, false)
                .map_err(|error| PipelineError::InvalidArgument {
                    name: "prompt",
                    reason: format!("cannot tokenize {text:?}: {error}"),
                })?;
        let per_chunk = self.max_length - 2;
        let content_count = encoding.len();
        let kept_count = content_count.min(per_chunk * max_chunks);
        let chunk_count = kept_count.div_ceil(per_chunk).max(1);
        // Content token `i` sits after its chunk's start token.
        let position = |index: usize| (index / per_chunk) * self.max_length + 1 + index % per_chunk;
        let offsets = encoding.get_offsets();

        let mut ids = Vec::with_capacity(chunk_count * self.max_length);
        let mut tokens = Vec::with_capacity(kept_count + 2 * chunk_count);
        let mut weights = Vec::with_capacity(chunk_count * self.max_length);
        for chunk in 0..chunk_count {
            let content = chunk * per_chunk..((chunk + 1) * per_chunk).min(kept_count);
            ids.push(self.start_token.id);
            tokens.push(self.start_token.text.clone());
            weights.push(1.0);
            ids.extend_from_slice(&encoding.get_ids()[content.clone()]);
            tokens.extend_from_slice(&encoding.get_tokens()[content.clone()]);
            weights.extend(
                offsets[content]
                    .iter()
                    .map(|&(start, _)| prompt.weight_at(start)),
            );
            ids.push(self.end_token.id);
            tokens.push(self.end_token.text.clone());
            weights.push(1.0);
            ids.resize((chunk + 1) * self.max_length, self.pad_token.id);
            weights.resize((chunk + 1) * self.max_length, 1.0);
        }

        let mut words = Vec::new();
        let mut dropped_words = Vec::new();
        for group in word_groups(&encoding) {
            let word = self.word_text(text, &encoding, &group);
            if is_punctuation_only(&word) {
                continue;
            }
            let token_indices: Vec<usize> = group
                .iter()
                .filter(|&&index| index < kept_count)
                .map(|&index| position(index))
                .collect();
            if token_indices.len() < group.len() {
                dropped_words.push(word.clone());
            }
            if !token_indices.is_empty() {
                words.push(WordSpan {
                    text: word,
                    token_indices,
                });
            }
        }
        Ok(PromptTokens {
            ids,
            tokens,
            words,
            chunk_count,
            weights,
            truncated_from: (kept_count < content_count).then_some(content_count + 2),
            dropped_words,
        })
    }

    /// The typed text behind a group of content tokens, passed through the tokenizer's normaliser
    /// (lower-cased for CLIP).
    fn word_text(&self, prompt: &str, encoding: &Encoding, group: &[usize]) -> String {
        let offsets = encoding.get_offsets();
        let start = group.iter().map(|&index| offsets[index].0).min();
        let end = group.iter().map(|&index| offsets[index].1).max();
        let typed = match (start, end) {
            (Some(start), Some(end)) => prompt.get(start..end).unwrap_or_default(),
            _ => "",
        };
        let mut normalized = NormalizedString::from(typed);
        let normalized_ok = match self.tokenizer.get_normalizer() {
            Some(normalizer) => normalizer.normalize(&mut normalized).is_ok(),
            None => true,
        };
        let text = if normalized_ok {
            normalized.get()
        } else {
            typed
        };
        text.trim().to_string()
    }
}

/// Groups content-token indices into words: consecutive tokens from the same pre-tokenised word
/// (for CLIP BPE a word ends at a token ending in `</w>`); tokens without a word id stand alone.
fn word_groups(encoding: &Encoding) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut previous_word: Option<u32> = None;
    for (index, word_id) in encoding.get_word_ids().iter().enumerate() {
        let continues = word_id.is_some() && *word_id == previous_word;
        match groups.last_mut() {
            Some(group) if continues => group.push(index),
            _ => groups.push(vec![index]),
        }
        previous_word = *word_id;
    }
    groups
}

/// True for text made only of punctuation (ASCII or common Unicode punctuation), or empty.
/// Emoji and symbols count as words.
fn is_punctuation_only(text: &str) -> bool {
    text.chars()
        .all(|c| c.is_whitespace() || c.is_ascii_punctuation() || is_unicode_punctuation(c))
}

/// Common non-ASCII punctuation: Latin-1 marks, the General Punctuation block, CJK punctuation and
/// full-width ASCII punctuation.
fn is_unicode_punctuation(c: char) -> bool {
    matches!(c,
        '¡' | '§' | '«' | '¶' | '·' | '»' | '¿'
        | '\u{2010}'..='\u{2027}'
        | '\u{2030}'..='\u{205E}'
        | '\u{3001}'..='\u{3003}'
        | '\u{3008}'..='\u{3011}'
        | '\u{3014}'..='\u{301F}'
        | '\u{FF01}'..='\u{FF0F}'
        | '\u{FF1A}'..='\u{FF20}'
        | '\u{FF3B}'..='\u{FF40}'
        | '\u{FF5B}'..='\u{FF65}')
}

/// Builds CLIP's BPE tokenizer from `vocab.json` + `merges.txt` like transformers' `CLIPConverter`:
/// NFC, whitespace runs -> one space, lowercase; split on CLIP's pattern; byte-level mapping;
/// `</w>` marks word ends.
fn build_clip_bpe(
    dir: &Path,
    unk_token: Option<&str>,
    special_tokens: &[AddedToken],
) -> PipelineResult<Tokenizer> {
    let vocab_path = existing_file(dir.join("vocab.json"), "tokenizer vocab.json")?;
    let merges_path = existing_file(dir.join("merges.txt"), "tokenizer merges.txt")?;
    let (Some(vocab_str), Some(merges_str)) = (vocab_path.to_str(), merges_path.to_str()) else {
        return Err(PipelineError::BadFile {
            path: dir.to_path_buf(),
            reason: "tokenizer path is not valid UTF-8".into(),
        });
    };
    let model = BPE::from_file(vocab_str, merges_str)
        .end_of_word_suffix("</w>".into())
        .unk_token(unk_token.unwrap_or(DEFAULT_END_TOKEN).into())
        .build()
        .map_err(|error| PipelineError::BadFile {
            path: merges_path.clone(),
            reason: format!("cannot build BPE from vocab.json + merges.txt: {error}"),
        })?;
    clip_tokenizer_from_model(model, dir, special_tokens)
}

/// CLIP's normaliser, pre-tokeniser and decoder around a BPE model, plus the special tokens;
/// `dir` names the tokenizer's source in errors.
fn clip_tokenizer_from_model(
    model: BPE,
    dir: &Path,
    special_tokens: &[AddedToken],
) -> PipelineResult<Tokenizer> {
    let builder_error = |error: tokenizers::Error| PipelineError::BadFile {
        path: dir.to_path_buf(),
        reason: format!("cannot build the CLIP tokenizer: {error}"),
    };
    let collapse_whitespace =
        Replace::new(ReplacePattern::Regex(r"\s+".into()), " ").map_err(builder_error)?;
    let normalizer = NormalizerSequence::new(vec![
        NFC.into(),
        collapse_whitespace.into(),
        Lowercase.into(),
    ]);
    let clip_split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT_PATTERN.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(builder_error)?;
    let pre_tokenizer = PreTokenizerSequence::new(vec![
        PreTokenizerWrapper::from(clip_split),
        PreTokenizerWrapper::from(ByteLevel::new(false, true, true)),
    ]);

    let mut tokenizer = Tokenizer::new(model);
    tokenizer
        .with_normalizer(Some(normalizer))
        .map_err(builder_error)?;
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    tokenizer
        .add_special_tokens(special_tokens.iter().cloned())
        .map_err(builder_error)?;
    Ok(tokenizer)
}

/// `path` if it is a file, else [`PipelineError::Missing`].
fn existing_file(path: PathBuf, what: &'static str) -> PipelineResult<PathBuf> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(PipelineError::Missing { what, path })
    }
}

/// The parts of `tokenizer_config.json` the prompt tokenizer uses.
#[derive(Clone, Debug)]
struct TokenizerConfig {
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
    unk_token: Option<String>,
    max_length: usize,
}

impl Default for TokenizerConfig {
    fn default() -> Self {
        Self {
            bos_token: None,
            eos_token: None,
            pad_token: None,
            unk_token: None,
            max_length: DEFAULT_MAX_LENGTH,
        }
    }
}

impl TokenizerConfig {
    fn from_file(path: &Path) -> PipelineResult<Self> {
        let bad_file = |reason: String| PipelineError::BadFile {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|error| bad_file(error.to_string()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|error| bad_file(error.to_string()))?;
        let bad_config = |reason: String| PipelineError::BadConfig {
            path: path.to_path_buf(),
            reason,
        };
        let token = |key: &str| -> PipelineResult<Option<String>> {
            match json.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(text)) => Ok(Some(text.clone())),
                Some(serde_json::Value::Object(object)) => match object.get("content") {
                    Some(serde_json::Value::String(text)) => Ok(Some(text.clone())),
                    _ => Err(bad_config(format!("{key} has no string \"content\""))),
                },
                Some(other) => Err(bad_config(format!(
                    "{key} must be a string or {{\"content\": ...}}, not {other}"
                ))),
            }
        };
        let max_length = match json.get("model_max_length") {
            None | Some(serde_json::Value::Null) => DEFAULT_MAX_LENGTH,
            Some(serde_json::Value::Number(number)) => {
                let as_length = number.as_u64().and_then(|n| usize::try_from(n).ok());
                match as_length {
                    Some(length) if length <= LARGEST_PLAUSIBLE_MAX_LENGTH => length,
                    Some(_) => DEFAULT_MAX_LENGTH,
                    None if number.as_f64().is_some_and(|n| n > 1e6) => DEFAULT_MAX_LENGTH,
                    None => {
                        return Err(bad_config(format!(
                            "model_max_length must be a positive integer, not {number}"
                        )))
                    }
                }
            }
            Some(other) => {
                return Err(bad_config(format!(
                    "model_max_length must be a number, not {other}"
                )))
            }
        };
        if max_length < 2 {
            return Err(bad_config(format!(
                "model_max_length {max_length} leaves no room for the start and end tokens"
            )));
        }
        Ok(Self {
            bos_token: token("bos_token")?,
            eos_token: token("eos_token")?,
            pad_token: token("pad_token")?,
            unk_token: token("unk_token")?,
            max_length,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd1_tokenizer() -> PromptTokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd1/tokenizer");
        PromptTokenizer::from_folder(&dir).unwrap()
    }

    fn spans(tokens: &PromptTokens) -> Vec<(&str, Vec<usize>)> {
        tokens
            .words
            .iter()
            .map(|word| (word.text.as_str(), word.token_indices.clone()))
            .collect()
    }

    #[test]
    fn one_span_per_word_with_positions_after_the_start_token() {
        let encoded = sd1_tokenizer()
            .encode("a photo of a cat wearing sunglasses")
            .unwrap();
        assert_eq!(
            spans(&encoded),
            [
                ("a", vec![1]),
                ("photo", vec![2]),
                ("of", vec![3]),
                ("a", vec![4]),
                ("cat", vec![5]),
                ("wearing", vec![6]),
                ("sunglasses", vec![7]),
            ]
        );
        assert_eq!(encoded.token_count(), 9);
        assert_eq!(encoded.warning(), None);
    }

    #[test]
    fn sub_word_tokens_merge_and_punctuation_is_left_out() {
        let encoded = sd1_tokenizer()
            .encode("hyphenated well-known, commas!!!")
            .unwrap();
        // hy phen ated</w> | well</w> -</w> known</w> ,</w> | com mas</w> | !!!</w>
        assert_eq!(
            spans(&encoded),
            [
                ("hyphenated", vec![1, 2, 3]),
                ("well", vec![4]),
                ("known", vec![6]),
                ("commas", vec![8, 9]),
            ]
        );
        assert_eq!(encoded.tokens[10], "!!!</w>");
    }

    #[test]
    fn capitals_are_lower_cased_and_accents_kept() {
        let encoded = sd1_tokenizer()
            .encode("UPPER MiXeD Zürich naïve 🐱")
            .unwrap();
        assert_eq!(
            spans(&encoded),
            [
                ("upper", vec![1]),
                ("mixed", vec![2]),
                ("zürich", vec![3, 4, 5]),
                ("naïve", vec![6, 7, 8]),
                ("🐱", vec![9]),
            ]
        );
    }

    #[test]
    fn empty_prompt_is_start_end_and_padding() {
        let encoded = sd1_tokenizer().encode("").unwrap();
        assert_eq!(encoded.ids.len(), 77);
        assert_eq!(encoded.ids[..3], [49406, 49407, 49407]);
        assert_eq!(encoded.tokens, ["<|startoftext|>", "<|endoftext|>"]);
        assert!(encoded.words.is_empty());
        assert_eq!(encoded.truncated_from, None);
    }

    #[test]
    fn long_prompt_is_truncated_with_a_warning() {
        let prompt = (0..80)
            .map(|index| if index < 74 { "word" } else { "tail" })
            .collect::<Vec<_>>()
            .join(" ");
        let encoded = sd1_tokenizer().encode(&prompt).unwrap();
        assert_eq!(encoded.ids.len(), 77);
        assert_eq!(encoded.ids[76], 49407);
        assert_eq!(encoded.tokens.len(), 77);
        assert_eq!(encoded.truncated_from, Some(82));
        assert_eq!(encoded.words.len(), 75);
        assert_eq!(encoded.words[74].token_indices, [75]);
        assert_eq!(encoded.dropped_words, ["tail"; 5]);
        let warning = encoded.warning().unwrap();
        assert!(
            warning.starts_with("prompt truncated to 77 tokens"),
            "{warning}"
        );
        assert!(
            warning.ends_with("dropped: tail tail tail tail tail"),
            "{warning}"
        );
    }

    /// A tiny word-level `tokenizer.json` like the bundled model's, with its config.
    fn word_level_folder(pad_token: &str) -> tempfile::TempDir {
        let folder = tempfile::tempdir().unwrap();
        let tokenizer_json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [],
            "normalizer": {"type": "Lowercase"},
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null,
            "decoder": null,
            "model": {
                "type": "WordLevel",
                "vocab": {"<unk>": 0, "<start>": 1, "<end>": 2, "<pad>": 3,
                          "an": 4, "orange": 5, "square": 6, ",": 7},
                "unk_token": "<unk>"
            }
        });
        let config = serde_json::json!({
            "bos_token": "<start>",
            "eos_token": {"content": "<end>", "special": true},
            "pad_token": pad_token,
            "unk_token": "<unk>",
            "model_max_length": 8
        });
        std::fs::write(
            folder.path().join("tokenizer.json"),
            tokenizer_json.to_string(),
        )
        .unwrap();
        std::fs::write(
            folder.path().join("tokenizer_config.json"),
            config.to_string(),
        )
        .unwrap();
        folder
    }

    #[test]
    fn word_level_tokenizer_uses_configured_special_tokens() {
        let folder = word_level_folder("<pad>");
        let tokenizer = PromptTokenizer::from_folder(folder.path()).unwrap();
        assert_eq!(tokenizer.max_length(), 8);
        let encoded = tokenizer.encode("An orange square,").unwrap();
        assert_eq!(encoded.ids, [1, 4, 5, 6, 7, 2, 3, 3]);
        assert_eq!(
            encoded.tokens,
            ["<start>", "an", "orange", "square", ",", "<end>"]
        );
        assert_eq!(
            spans(&encoded),
            [("an", vec![1]), ("orange", vec![2]), ("square", vec![3])]
        );
    }

    #[test]
    fn word_level_unknown_words_become_the_unknown_token() {
        let folder = word_level_folder("<pad>");
        let tokenizer = PromptTokenizer::from_folder(folder.path()).unwrap();
        let encoded = tokenizer.encode("a Purple square").unwrap();
        assert_eq!(encoded.ids, [1, 0, 0, 6, 2, 3, 3, 3]);
        assert_eq!(
            spans(&encoded),
            [("a", vec![1]), ("purple", vec![2]), ("square", vec![3])]
        );
        let long = tokenizer
            .encode("an orange square an orange square an")
            .unwrap();
        assert_eq!(long.ids, [1, 4, 5, 6, 4, 5, 6, 2]);
        assert_eq!(long.truncated_from, Some(9));
        assert_eq!(long.dropped_words, ["an"]);
    }

    #[test]
    fn special_token_missing_from_the_vocabulary_is_a_config_error() {
        let folder = word_level_folder("<nothing>");
        let error = PromptTokenizer::from_folder(folder.path()).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("tokenizer_config.json"), "{message}");
        assert!(message.contains("pad_token"), "{message}");
    }

    #[test]
    fn missing_folder_is_reported_with_its_path() {
        let error = PromptTokenizer::from_folder(Path::new("/no/such/tokenizer")).unwrap_err();
        assert!(error.to_string().contains("/no/such/tokenizer"));
    }
}

//! The plain-data description of a Prompt-to-Prompt edit: step windows, reweights, local blend
//! settings, the local-blend mask, and what a model recommends. `crate::attention::p2p` turns it
//! into attention edits; the worker's channel carries it as it is.

use std::ops::Range;

use crate::analysis::alignment::EditKind;

/// A binary mask at latent resolution (1 where the edited latent may change).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BlendMask {
    /// Rows.
    pub h: usize,
    /// Columns.
    pub w: usize,
    /// `[h, w]`, row-major, 0 or 1.
    pub data: Vec<f32>,
}

impl BlendMask {
    /// Fraction of cells that are 1.
    pub fn coverage(&self) -> f32 {
        if self.data.is_empty() {
            return 0.0;
        }
        self.data.iter().sum::<f32>() / self.data.len() as f32
    }
}

/// Prompt-to-Prompt settings a model folder recommends for its edits that change words (swaps and
/// refinements), read from the optional `_attend_edit_defaults` object of `model_index.json`
/// (`{"self_replace": 0.2, "self_replace_max_side": 32}`). A field that is absent means "the
/// reference's value" (self window 0.4, layers up to 16x16), so real checkpoints, which never carry
/// the key, get P2P's defaults.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EditDefaults {
    /// End of the self-attention replacement window, as a fraction of the steps (`0..=1`).
    pub self_replace_end: Option<f64>,
    /// Largest query-grid side whose self-attention is replaced.
    pub self_replace_max_side: Option<usize>,
}

/// A window of denoising steps, as fractions of the run (`0.0..=1.0`).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepWindow {
    /// Fraction of the run where the window opens.
    pub start: f64,
    /// Fraction of the run where it closes (exclusive).
    pub end: f64,
}

impl StepWindow {
    /// The window from the first step to `end` (the reference's single-number form).
    pub fn until(end: f64) -> Self {
        Self { start: 0.0, end }
    }

    /// The window `start..end`.
    pub fn new(start: f64, end: f64) -> Self {
        Self { start, end }
    }

    /// Steps of a cross-attention window in a run of `step_count` steps:
    /// `floor(start * (N + 1)) .. floor(end * (N + 1))`, cut to `0..N`.
    pub fn cross_steps(&self, step_count: usize) -> Range<usize> {
        self.steps_over(step_count + 1, step_count)
    }

    /// Steps of a self-attention window (and of the local blend start) in a run of `step_count`
    /// steps: `floor(start * N) .. floor(end * N)`.
    pub fn self_steps(&self, step_count: usize) -> Range<usize> {
        self.steps_over(step_count, step_count)
    }

    fn steps_over(&self, table_rows: usize, step_count: usize) -> Range<usize> {
        let scaled = |fraction: f64| {
            let value = (fraction * table_rows as f64).floor();
            if value.is_nan() || value <= 0.0 {
                0
            } else {
                (value as usize).min(step_count)
            }
        };
        let start = scaled(self.start);
        start..scaled(self.end).max(start)
    }
}

/// The cross-attention replacement window: one for every token, with overrides for words of the
/// edited prompt (the reference's `{"default_": .., word: ..}` form).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CrossWindow {
    /// The window of every token without an override (including start, end and padding tokens).
    pub default: StepWindow,
    /// `(word of the edited prompt, window)`; every occurrence of the word gets the window (only
    /// the k-th for `word#k`).
    pub per_word: Vec<(String, StepWindow)>,
}

impl CrossWindow {
    /// The same window for every token.
    pub fn uniform(window: StepWindow) -> Self {
        Self {
            default: window,
            per_word: Vec::new(),
        }
    }
}

/// Self-attention replacement: inside the window, layers with at most `max_queries` queries take the
/// source's self-attention.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SelfReplace {
    /// Steps where the source's self-attention is used.
    pub window: StepWindow,
    /// Largest query count (`h * w`) of a layer that is replaced; 256 (16x16) in the reference.
    pub max_queries: usize,
}

impl Default for SelfReplace {
    fn default() -> Self {
        Self {
            window: StepWindow::until(0.4),
            max_queries: 16 * 16,
        }
    }
}

impl SelfReplace {
    /// The reference's setting with what a model folder recommends for edits that change words in its
    /// place ([`EditDefaults`]; the bundled model asks for layers up to 32x32 for the first 20% of
    /// the steps).
    pub fn recommended(defaults: EditDefaults) -> Self {
        let reference = Self::default();
        Self {
            window: defaults
                .self_replace_end
                .map_or(reference.window, StepWindow::until),
            max_queries: defaults
                .self_replace_max_side
                .map_or(reference.max_queries, |side| side * side),
        }
    }

    /// The setting an edit starts with: `word_edit` (the model's recommendation,
    /// [`SelfReplace::recommended`]) when the edited prompt changes words (a swap or a refinement),
    /// the reference's when it only reweights the source prompt. Holding the source's layout is what
    /// keeps a swapped object in place, and what keeps a reweighted object from going away (on the
    /// bundled model a weight of -1 removed or halved the object in 42% of cases with its
    /// recommendation, 67% with the reference's setting).
    pub fn for_edit(word_edit: Self, source_prompt: &str, edit_prompt: &str) -> Self {
        if changes_words(source_prompt, edit_prompt) {
            word_edit
        } else {
            Self::default()
        }
    }
}

/// How a word swap on an inverted (given) image starts, where it differs from a swap on a
/// generated image. Chosen by measurement on drawn scenes inverted with `direct` (`attend
/// edit-eval --real-images`; numbers in the benchmarks document).
///
/// An exact inversion's source branch runs through the image's own latents, so the self-attention
/// it records holds the old object's outline: replaced for long, the new shape is not drawn; not
/// replaced, the edited branch drifts away from the image. Local blend takes the drift away
/// outside the swapped object's words (the edited latents there are the source's), which lets
/// the self-attention window end early so the new shape can form inside.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InvertedImageSwap {
    /// Blend locally on the swapped words (the caller names them).
    pub local_blend: bool,
    /// Where the self-attention window ends, as a fraction of the steps (from the first step);
    /// `None`: the model's recommendation as for generated images.
    pub self_replace_end: Option<f64>,
    /// The swapped (new) words' weight in the edited prompt ([`Reweight`]; 1: none). The inverted
    /// noise holds the old shape firmly; a heavier new word is what redraws it.
    pub swapped_word_weight: f32,
}

/// The settings a word swap on an inverted image starts with (see [`InvertedImageSwap`]).
///
/// Measured (bundled model, 20 steps, tuning scenes): the recommended window (0-0.2 up to 32x32)
/// without blend kept every target in place but drew the new shape in 4 of 6; no window without
/// blend drew it in all 6 but moved the target or another object in 2; no window with local
/// blend did both. On held-out scenes it kept every target in place and the rest unchanged (5 of
/// 5) but drew the new shape in only 1 of 5. At 10 steps the new shape was drawn less often, so
/// the step count stays.
pub const INVERTED_IMAGE_SWAP: InvertedImageSwap = InvertedImageSwap {
    local_blend: true,
    self_replace_end: Some(0.0),
    swapped_word_weight: 4.0,
};

impl InvertedImageSwap {
    /// `recommended` (the model's setting for swaps on generated images) with this window end.
    pub fn self_replace(&self, recommended: SelfReplace) -> SelfReplace {
        match self.self_replace_end {
            Some(end) => SelfReplace {
                window: StepWindow::until(end),
                ..recommended
            },
            None => recommended,
        }
    }
}

/// True when the two prompts differ in their words (case and punctuation aside).
pub fn changes_words(source_prompt: &str, edit_prompt: &str) -> bool {
    !crate::analysis::plain_words(source_prompt).eq(crate::analysis::plain_words(edit_prompt))
}

/// Scale the edited prompt's attention to a word (the reference's equalizer).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Reweight {
    /// A word of the edited prompt; every occurrence is scaled, or only the k-th for `word#k`.
    pub word: String,
    /// The factor; 1 changes nothing, 0 removes the word's attention, negative values invert it.
    pub scale: f32,
}

/// Local blend settings.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LocalBlendConfig {
    /// Words whose maps decide where the edited latent may change; each is looked up in both prompts
    /// (the source's occurrences in the source's attention, the edit's in the edited attention).
    /// `word#k` names only the k-th occurrence in each prompt ("square#2" in "a red square and a blue
    /// square" is the blue one); a `source:` or `edit:` prefix looks the word up in that prompt alone
    /// ("edit:square#1").
    pub words: Vec<String>,
    /// Words whose region must not change (optional).
    pub subtract_words: Vec<String>,
    /// Threshold on the max-normalised, max-pooled map. Default 0.3.
    pub threshold: f32,
    /// Threshold of the subtract-words' map (not pooled). Default 0.3.
    pub subtract_threshold: f32,
    /// The blend acts after each step from `floor(start_fraction * N)` on. Default 0.2.
    pub start_fraction: f64,
    /// Side of the cross-attention grid whose maps are used; `None`: the grid nearest a quarter of
    /// the latent side (16 for a 64x64 latent, as in the reference).
    pub map_side: Option<usize>,
    /// A mask given by the user (e.g. from a segment), at any resolution, 1 where the edited latent
    /// may change. When set it replaces the word-derived mask (resized to the latent, nearest, cells
    /// at least 0.5 inside); `words` may then be empty. Old files without it load as `None`.
    #[serde(default)]
    pub mask: Option<BlendMask>,
}

impl Default for LocalBlendConfig {
    fn default() -> Self {
        Self {
            words: Vec::new(),
            subtract_words: Vec::new(),
            threshold: 0.3,
            subtract_threshold: 0.3,
            start_fraction: 0.2,
            map_side: None,
            mask: None,
        }
    }
}

impl LocalBlendConfig {
    /// Default settings blending on these words.
    pub fn new(words: Vec<String>) -> Self {
        Self {
            words,
            ..Self::default()
        }
    }

    /// True when the blend acts after step `step_index` of a run of `step_count` steps.
    pub fn is_active(&self, step_index: usize, step_count: usize) -> bool {
        step_index
            >= StepWindow::until(self.start_fraction)
                .self_steps(step_count)
                .end
    }
}

/// Everything that defines an edit, as plain data (what a session file keeps).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EditSpec {
    /// The edited prompt.
    pub edit_prompt: String,
    /// Replace or refine; `None` infers it (same word count: replace).
    pub kind: Option<EditKind>,
    /// Cross-attention replacement window. Default `0.0..0.8`.
    pub cross_window: CrossWindow,
    /// Self-attention replacement. Default `0.0..0.4`, layers up to 16x16.
    pub self_replace: SelfReplace,
    /// Per-word scales applied after replace/refine.
    pub reweights: Vec<Reweight>,
    /// Local blend; `None` lets the whole image change.
    pub local_blend: Option<LocalBlendConfig>,
}

impl EditSpec {
    /// The reference's typical settings (cross 0.8, self 0.4, no reweight, no blend) for this prompt.
    pub fn new(edit_prompt: impl Into<String>) -> Self {
        Self {
            edit_prompt: edit_prompt.into(),
            kind: None,
            cross_window: CrossWindow::uniform(StepWindow::until(0.8)),
            self_replace: SelfReplace::default(),
            reweights: Vec::new(),
            local_blend: None,
        }
    }
}

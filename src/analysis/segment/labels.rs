//! Naming segments with prompt words (after local-prompt-mixing): every word's cross-attention map is
//! min-max normalised; a segment's score for a word is the mean of that map over the segment; a word
//! can label the segment only when its score is above the threshold (0.3 there), otherwise the
//! segment is background. Among the words above the threshold, attend by default picks the one with
//! the most raw attention over the segment ([`LabelChoice::MostAttention`]): the words of one prompt
//! share each pixel's softmax, so their raw attention is comparable, whereas min-max normalisation
//! stretches a word that is weak everywhere to full range. local-prompt-mixing's rule (the highest
//! score) is [`LabelChoice::HighestScore`]. All scores are kept.

use super::Segmentation;
use crate::analysis::heatmap::{min_max_normalize, resize_bilinear, Heatmap};
use crate::analysis::{AnalysisError, AnalysisResult};

/// Settings of [`label_segments`].
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LabelSettings {
    /// The best word labels a segment only when its score is above this. Default 0.3
    /// (local-prompt-mixing).
    pub threshold: f32,
    /// The label of segments no word covers well enough. Default `background`.
    pub background_label: String,
    /// How the label is chosen among the words above the threshold.
    #[serde(default)]
    pub choice: LabelChoice,
}

impl Default for LabelSettings {
    fn default() -> Self {
        Self {
            threshold: 0.3,
            background_label: "background".to_string(),
            choice: LabelChoice::default(),
        }
    }
}

/// How a segment's label is chosen among the words whose score is above the threshold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LabelChoice {
    /// The word with the most raw cross-attention over the segment ([`WordScore::attention`]).
    /// Default.
    #[default]
    MostAttention,
    /// The word with the highest score, the mean of its min-max normalised map
    /// (local-prompt-mixing).
    HighestScore,
}

impl LabelChoice {
    /// Both choices, for menus.
    pub const ALL: [LabelChoice; 2] = [LabelChoice::MostAttention, LabelChoice::HighestScore];

    /// A short name for menus and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            LabelChoice::MostAttention => "most-attention",
            LabelChoice::HighestScore => "highest-score",
        }
    }
}

impl std::fmt::Display for LabelChoice {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.name())
    }
}

impl std::str::FromStr for LabelChoice {
    type Err = String;

    /// Case-insensitive `most-attention` or `highest-score`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        LabelChoice::ALL
            .into_iter()
            .find(|choice| choice.name().eq_ignore_ascii_case(text.trim()))
            .ok_or_else(|| {
                format!("unknown label choice {text:?} (expected most-attention or highest-score)")
            })
    }
}

/// A word and its cross-attention map, borrowed: build it from a [`Heatmap`] (`From`) or from a plain
/// `(text, map)` pair of raw attention with [`WordMapRef::new`]. The map need not be normalised.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WordMapRef<'a> {
    /// The word.
    pub word: &'a str,
    /// Map height.
    pub h: usize,
    /// Map width.
    pub w: usize,
    /// `[h, w]`, row-major.
    pub data: &'a [f32],
    /// `(floor, peak)`: the raw attention of a value `v` of `data` is `floor + v * (peak - floor)`
    /// (`(0, 1)` when `data` is raw attention itself).
    pub raw_range: (f32, f32),
}

impl<'a> WordMapRef<'a> {
    /// A word with its `[h, w]` map of raw attention.
    pub fn new(word: &'a str, h: usize, w: usize, data: &'a [f32]) -> Self {
        Self {
            word,
            h,
            w,
            data,
            raw_range: (0.0, 1.0),
        }
    }

    /// Raw attention for the mean `value` of `data` over some cells.
    fn raw(&self, value: f32) -> f32 {
        let (floor, peak) = self.raw_range;
        floor + value * (peak - floor)
    }
}

impl<'a> From<&'a Heatmap> for WordMapRef<'a> {
    fn from(heatmap: &'a Heatmap) -> Self {
        Self {
            word: &heatmap.word,
            h: heatmap.h,
            w: heatmap.w,
            data: &heatmap.data,
            raw_range: heatmap.raw_range(),
        }
    }
}

/// One word's score for a segment.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WordScore {
    /// The word.
    pub word: String,
    /// Mean of the word's min-max normalised map over the segment, 0..1.
    pub score: f32,
    /// Mean raw cross-attention of the word over the segment (comparable between the words of one
    /// prompt; what [`LabelChoice::MostAttention`] compares).
    #[serde(default)]
    pub attention: f32,
}

/// A labelled segment: what the Segments view lists and `segments.json` holds.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SegmentInfo {
    /// Segment id (index into the segmentation's ids).
    pub id: usize,
    /// The best word, or the background label.
    pub label: String,
    /// The label word's index into `scores` (the words that competed for labels, in the order
    /// given), `None` for background. Not a position among the prompt's words: that is
    /// `prompt_word_index`. Written as `label_word_index` (files that say `word_index` still read).
    #[serde(rename = "label_word_index", alias = "word_index")]
    pub word_index: Option<usize>,
    /// The label word's position among the prompt's words (0 for the first word), when the caller
    /// knows the prompt ([`set_prompt_word_indices`]); `None` for background.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_word_index: Option<usize>,
    /// Every word's score, in the order the words were given.
    pub scores: Vec<WordScore>,
    /// Cells (pixels, for a segmentation at image resolution) in the segment.
    pub pixel_count: usize,
}

impl SegmentInfo {
    /// The score of the label word (0 for background).
    pub fn label_score(&self) -> f32 {
        self.word_index
            .and_then(|index| self.scores.get(index))
            .map_or(0.0, |score| score.score)
    }
}

/// Scores every segment of `segmentation` against every word and labels it (see the module docs).
///
/// A word map at least as large as the segmentation is averaged over the map pixels whose nearest
/// segmentation cell is in the segment; a smaller one is first upsampled bilinearly to the
/// segmentation's grid. Maps are min-max normalised after that. Fails when a map's data is not
/// `h * w` long or is empty.
pub fn label_segments(
    segmentation: &Segmentation,
    words: &[WordMapRef<'_>],
    settings: &LabelSettings,
) -> AnalysisResult<Vec<SegmentInfo>> {
    let segment_count = segmentation.segment_count;
    let pixel_counts = segmentation.cell_counts();
    // scores[segment][word]: (score, raw attention)
    let mut scores = vec![vec![(0.0f32, 0.0f32); words.len()]; segment_count];
    for (word_index, word) in words.iter().enumerate() {
        if word.h == 0 || word.w == 0 || word.data.len() != word.h * word.w {
            return Err(AnalysisError::InvalidArgument {
                name: "word map",
                reason: format!(
                    "map of {:?} has {} values for {}x{} (expected {}, not empty)",
                    word.word,
                    word.data.len(),
                    word.h,
                    word.w,
                    word.h * word.w
                ),
            });
        }
        let word_scores = segment_means(segmentation, word);
        for (segment_scores, (score, mean)) in scores.iter_mut().zip(word_scores) {
            segment_scores[word_index] = (score, word.raw(mean));
        }
    }
    Ok(scores
        .into_iter()
        .enumerate()
        .map(|(id, segment_scores)| {
            let best = segment_scores
                .iter()
                .enumerate()
                .filter(|(_, &(score, _))| score > settings.threshold)
                .map(|(index, &(score, attention))| match settings.choice {
                    LabelChoice::MostAttention => (index, attention),
                    LabelChoice::HighestScore => (index, score),
                })
                .fold(
                    None,
                    |best: Option<(usize, f32)>, (index, key)| match best {
                        Some((_, best_key)) if best_key >= key => best,
                        _ => Some((index, key)),
                    },
                );
            SegmentInfo {
                id,
                label: best.map_or_else(
                    || settings.background_label.clone(),
                    |(index, _)| words[index].word.to_string(),
                ),
                word_index: best.map(|(index, _)| index),
                prompt_word_index: None,
                scores: words
                    .iter()
                    .zip(segment_scores)
                    .map(|(word, (score, attention))| WordScore {
                        word: word.word.to_string(),
                        score,
                        attention,
                    })
                    .collect(),
                pixel_count: pixel_counts.get(id).copied().unwrap_or(0),
            }
        })
        .collect())
}

/// `[segment_count]`: per segment, the mean of the word's min-max normalised map and the mean of
/// its map as given (both 0 for a segment the map does not reach).
fn segment_means(segmentation: &Segmentation, word: &WordMapRef<'_>) -> Vec<(f32, f32)> {
    let (seg_h, seg_w) = (segmentation.h, segmentation.w);
    // (sum of normalised, sum as given, count) per segment
    let mut sums = vec![(0.0f64, 0.0f64, 0usize); segmentation.segment_count];
    let mut accumulate = |label: usize, normalised: f32, given: f32| {
        if let Some(sum) = sums.get_mut(label) {
            sum.0 += f64::from(normalised);
            sum.1 += f64::from(given);
            sum.2 += 1;
        }
    };
    // The map on (or above) the segmentation's grid; a smaller map is upsampled to the grid first.
    let on_grid = word.h >= seg_h && word.w >= seg_w;
    let given = if on_grid {
        word.data.to_vec()
    } else {
        resize_bilinear(word.data, word.h, word.w, seg_h, seg_w)
    };
    let (map_h, map_w) = if on_grid {
        (word.h, word.w)
    } else {
        (seg_h, seg_w)
    };
    let cell_of = |index: usize| {
        let (y, x) = (index / map_w, index % map_w);
        (y * seg_h / map_h) * seg_w + x * seg_w / map_w
    };
    let mut normalised = given.clone();
    min_max_normalize(&mut normalised);
    for (index, (&value, &given_value)) in normalised.iter().zip(&given).enumerate() {
        if let Some(&label) = segmentation.labels.get(cell_of(index)) {
            accumulate(label, value, given_value);
        }
    }
    sums.iter()
        .map(|&(normalised_sum, given_sum, count)| {
            if count == 0 {
                (0.0, 0.0)
            } else {
                let count = count as f64;
                ((normalised_sum / count) as f32, (given_sum / count) as f32)
            }
        })
        .collect()
}

/// Sets every labelled segment's [`SegmentInfo::prompt_word_index`]: `prompt_positions[i]` is the
/// position among the prompt's words of the `i`-th word that competed for labels. Background
/// segments, and words without a position, get `None`.
pub fn set_prompt_word_indices(segments: &mut [SegmentInfo], prompt_positions: &[usize]) {
    for segment in segments {
        segment.prompt_word_index = segment
            .word_index
            .and_then(|index| prompt_positions.get(index).copied());
    }
}

/// Ids of the segments labelled `label` (the union is that word's object mask).
pub fn segments_with_label(segments: &[SegmentInfo], label: &str) -> Vec<usize> {
    segments
        .iter()
        .filter(|segment| segment.label == label)
        .map(|segment| segment.id)
        .collect()
}

/// Words that name nothing on their own: articles, prepositions, conjunctions, and the "a photo of"
/// words that Cross-Image Attention also skips.
const FUNCTION_WORDS: &[&str] = &[
    "a",
    "an",
    "the",
    "and",
    "or",
    "of",
    "on",
    "in",
    "at",
    "to",
    "with",
    "by",
    "for",
    "from",
    "into",
    "onto",
    "over",
    "under",
    "near",
    "next",
    "its",
    "his",
    "her",
    "their",
    "is",
    "are",
    "photo",
    "image",
    "picture",
    "painting",
    "drawing",
    "rendering",
];

/// Whether a prompt word should compete for segment labels by default: not a function word (see
/// above) and not a colour name of the drawn-scene palette (colours are adjectives: they share the
/// object's region with its noun and would take its label). The UI and the CLI let the user override.
pub fn is_label_candidate(word: &str) -> bool {
    let word = word.trim().to_lowercase();
    if word.is_empty() || !word.chars().any(char::is_alphanumeric) {
        return false;
    }
    if FUNCTION_WORDS.contains(&word.as_str()) {
        return false;
    }
    word.parse::<crate::scenes::Colour>().is_err()
}

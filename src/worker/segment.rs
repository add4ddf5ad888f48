//! Segmenting a finished run for the editor's Segments view: the plain request and file types of
//! [`crate::worker::Command::Segment`] and [`crate::worker::Command::ExportSegmentFiles`], and the
//! code both engines share (pick the self-attention maps, build the word maps, cluster and label,
//! the way `attend segment` does).

use std::path::{Path, PathBuf};

use crate::analysis::export::ExportError;
use crate::analysis::heatmap::{
    word_heatmaps, AggregationSettings, SelfAttentionMap, SelfAttentionSpan, StepCross, UnetPlace,
};
use crate::analysis::segment::{
    is_label_candidate, segment_and_label, write_label_map_png, write_mask_png,
    write_segments_json, LabelledSegmentation, Mask, SegmentMethod, SegmentSettings, Segmentation,
    SegmentsFile, WordMapRef,
};
use crate::analysis::WordSpan;
use crate::worker::error::EngineError;

/// How to segment the finished run: what [`crate::worker::Command::Segment`] carries.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SegmentRequest {
    /// Method, k, thresholds and labelling.
    pub settings: SegmentSettings,
    /// Cluster only the self-attention at this grid `(h, w)`; `None` uses the method's own choice
    /// (KMeans: the largest grid; DiffSeg: every grid).
    pub grid: Option<(usize, usize)>,
    /// Self-attention of the last step or the mean over all steps.
    pub span: SelfAttentionSpan,
}

/// One segmentation file to write atomically ([`crate::worker::Command::ExportSegmentFiles`]).
#[derive(Clone, Debug)]
pub enum SegmentFileExport {
    /// A mask as an 8-bit greyscale PNG, white inside, black outside.
    Mask {
        /// Destination file.
        path: PathBuf,
        /// The mask at image resolution.
        mask: Mask,
    },
    /// The label map as a greyscale PNG of segment ids.
    LabelMap {
        /// Destination file.
        path: PathBuf,
        /// The segment ids at image resolution.
        labels: Segmentation,
    },
    /// The segments (id, label, scores, pixel count) as JSON.
    Json {
        /// Destination file.
        path: PathBuf,
        /// The file's content.
        file: SegmentsFile,
    },
}

impl SegmentFileExport {
    /// The destination file.
    pub fn path(&self) -> &Path {
        match self {
            Self::Mask { path, .. } | Self::LabelMap { path, .. } | Self::Json { path, .. } => path,
        }
    }

    /// Writes the file atomically (nothing partial is left behind on failure).
    pub fn write(&self) -> Result<(), ExportError> {
        match self {
            Self::Mask { path, mask } => write_mask_png(path, mask),
            Self::LabelMap { path, labels } => write_label_map_png(path, labels),
            Self::Json { path, file } => write_segments_json(path, file),
        }
    }
}

/// The places whose self-attention a method clusters (as `attend segment` does): KMeans the down
/// and up blocks (local-prompt-mixing), DiffSeg every block.
pub(crate) fn self_attention_places(method: SegmentMethod) -> &'static [UnetPlace] {
    match method {
        SegmentMethod::KMeans => &[UnetPlace::Down, UnetPlace::Up],
        SegmentMethod::DiffSeg => &[UnetPlace::Down, UnetPlace::Mid, UnetPlace::Up],
    }
}

/// The grids to take self-attention from: the requested one (which must be among `available`), or
/// every available grid.
pub(crate) fn requested_grids(
    request: &SegmentRequest,
    available: &[(usize, usize)],
) -> Result<Vec<(usize, usize)>, EngineError> {
    match request.grid {
        Some(grid) if available.contains(&grid) => Ok(vec![grid]),
        Some((h, w)) => Err(EngineError::InvalidArgument {
            name: "segmentation resolution",
            reason: format!(
                "no self-attention was kept at {h}x{w} (kept: {})",
                available
                    .iter()
                    .map(|(h, w)| format!("{h}x{w}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
        None => Ok(available.to_vec()),
    }
}

/// Segments a run from its self-attention `maps` and labels the segments with the prompt words that
/// can name things ([`is_label_candidate`]; every word when none can), scored on DAAM word heat
/// maps at image size over all of the run's `steps`.
pub(crate) fn segment_run(
    maps: &[SelfAttentionMap],
    steps: &[StepCross],
    words: &[WordSpan],
    image_h: usize,
    image_w: usize,
    request: &SegmentRequest,
) -> Result<LabelledSegmentation, EngineError> {
    if maps.is_empty() {
        return Err(EngineError::Unavailable(
            "the run kept no self-attention to segment".to_owned(),
        ));
    }
    let candidates: Vec<WordSpan> = words
        .iter()
        .filter(|word| is_label_candidate(&word.text))
        .cloned()
        .collect();
    let label_words = if candidates.is_empty() {
        words
    } else {
        &candidates
    };
    let heatmaps = word_heatmaps(
        steps,
        label_words,
        &AggregationSettings::default(),
        image_h,
        image_w,
    );
    let word_maps: Vec<WordMapRef<'_>> = heatmaps.iter().map(WordMapRef::from).collect();
    Ok(segment_and_label(
        maps,
        &word_maps,
        &request.settings,
        image_h,
        image_w,
    )?)
}

//! The limits of a run, checked in one place before anything is allocated: steps, guidance, image
//! size, and the memory the run will need against the memory the machine has.
//!
//! # Limits
//! - **steps**: `1..=`[`MAX_STEPS`] (the schedulers' training schedule has 1000 timesteps).
//! - **guidance**: finite, `0..=`[`MAX_GUIDANCE`]; values `<= 1` turn classifier-free guidance off.
//!   Larger scales push the noise prediction past what f32 holds and end in NaN latents.
//! - **width / height**: positive multiples of the model's size multiple, at most [`MAX_SIDE_PX`].
//! - **memory**: [`estimate_run_memory`] of the run (capture included) must fit in the memory
//!   available ([`available_memory`]: `MemAvailable` of `/proc/meminfo` on Linux,
//!   [`FALLBACK_AVAILABLE_BYTES`] elsewhere). The estimate is rough (within about a factor of two
//!   of the measured peak); it exists to refuse runs that cannot fit, before they start, instead of
//!   aborting on a failed allocation after minutes of work.
//!
//! All size arithmetic saturates or is checked, so absurd sizes give an error, never a panic.

use std::path::Path;

use candle_core::DType;

use crate::pipeline::model::StableDiffusion;
use crate::pipeline::sampling::GenerateRequest;
use crate::pipeline::unet::config::{DownBlockKind, UpBlockKind};
use crate::pipeline::unet::UnetConfig;
use crate::pipeline::vae::VaeConfig;
use crate::pipeline::{PipelineError, PipelineResult};

/// Most denoising steps a run may have.
pub const MAX_STEPS: usize = 1000;

/// Largest classifier-free guidance scale accepted (SD is used at 1 to about 20).
pub const MAX_GUIDANCE: f64 = 100.0;

/// Largest image side in pixels: 16 times SD 1.x's training size; the VAE decode of an 8192 px
/// square alone needs over 100 GiB.
pub const MAX_SIDE_PX: usize = 8192;

/// Memory assumed available where the operating system does not say (not Linux): 4 GiB.
pub const FALLBACK_AVAILABLE_BYTES: u64 = 4 << 30;

/// Full-size tensors of the largest UNet level alive at once while a block runs (its input and
/// the skip it concatenates, group norm, projections, residual sums).
const UNET_WORKING_TENSORS: u64 = 8;

/// Full-size tensors of the largest VAE decoder level alive at once (input, norm, conv, residual).
const VAE_WORKING_TENSORS: u64 = 4;

/// Bounded work buffers of the kernels (im2col and Winograd chunks, feed-forward and score blocks).
const KERNEL_BUFFER_BYTES: u64 = 64 << 20;

/// Bytes of one f32.
const F32_BYTES: u64 = 4;

/// What a run keeps besides its image, for [`estimate_run_memory`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunCapture {
    /// An attention store keeps the cross-attention maps of every step, this many tokens each
    /// (0: no store).
    pub cross_tokens: usize,
    /// The store keeps self-attention maps of query grids with `max(h, w) <=` this side
    /// (0: none).
    pub self_max_side: usize,
    /// A Prompt-to-Prompt replay recording keeps every step's attention: every cross layer, and
    /// the self layers with at most this many queries (`None`: no recording).
    pub replay_self_max_queries: Option<usize>,
    /// Prompts denoised side by side in one UNet batch (0 and 1 both mean one; a Prompt-to-Prompt
    /// batch edit has 2).
    pub prompts: usize,
}

impl RunCapture {
    /// Nothing kept but the image and the latents.
    pub fn none() -> Self {
        Self::default()
    }

    /// An attention store keeping `cross_tokens` tokens of every cross map and the self maps up
    /// to `self_max_side` (0: none).
    pub fn store(cross_tokens: usize, self_max_side: usize) -> Self {
        Self {
            cross_tokens,
            self_max_side,
            ..Self::default()
        }
    }

    /// The same, with a replay recording of the self layers up to `self_max_queries` queries.
    pub fn with_replay_recording(self, self_max_queries: usize) -> Self {
        Self {
            replay_self_max_queries: Some(self_max_queries),
            ..self
        }
    }

    /// The same, with `prompts` prompts in one UNet batch.
    pub fn with_prompts(self, prompts: usize) -> Self {
        Self { prompts, ..self }
    }

    fn prompt_count(&self) -> u64 {
        self.prompts.max(1) as u64
    }
}

/// The facts of a model that set a run's memory, read from its configs (no weights needed).
#[derive(Clone, Debug)]
pub struct ModelFootprint {
    unet: UnetConfig,
    vae: Option<VaeConfig>,
    /// Image pixels per latent cell along each side (the VAE's factor, 1 in pixel space).
    latent_factor: u64,
    /// Text tokens every cross-attention layer attends to (77).
    text_tokens: usize,
    /// Bytes of one activation in the compute dtype.
    activation_bytes: u64,
    /// True when activations live in main memory (the CPU device).
    on_cpu: bool,
}

impl ModelFootprint {
    /// The footprint of a loaded model.
    pub fn of_model(model: &StableDiffusion) -> Self {
        Self::from_configs(
            model.unet.config(),
            model.vae_config.as_ref(),
            model.text_encoder_config.max_position_embeddings,
            model.dtype(),
            model.device().is_cpu(),
        )
    }

    /// The footprint of a model given by its configs, computing in `dtype` on the CPU when
    /// `on_cpu`.
    pub fn from_configs(
        unet: &UnetConfig,
        vae: Option<&VaeConfig>,
        text_tokens: usize,
        dtype: DType,
        on_cpu: bool,
    ) -> Self {
        Self {
            unet: unet.clone(),
            vae: vae.cloned(),
            latent_factor: vae.map_or(1, |vae| vae.downscale_factor() as u64),
            text_tokens,
            activation_bytes: dtype.size_in_bytes() as u64,
            on_cpu,
        }
    }

    /// The footprint of a UNet alone (a benchmark's), whose latent cells cover `latent_factor`
    /// pixels along each side; nothing is decoded.
    pub fn unet_only(
        unet: &UnetConfig,
        latent_factor: usize,
        text_tokens: usize,
        dtype: DType,
        on_cpu: bool,
    ) -> Self {
        Self {
            latent_factor: latent_factor as u64,
            ..Self::from_configs(unet, None, text_tokens, dtype, on_cpu)
        }
    }

    /// Every attention layer of one UNet pass: (query grid cells, heads, is cross-attention, place
    /// and grid of its store group).
    fn attention_layers(&self, latent_h: u64, latent_w: u64) -> Vec<AttentionLayer> {
        let mut layers = Vec::new();
        let grid = |level: usize| {
            let shift = level.min(63) as u32;
            (latent_h >> shift, latent_w >> shift)
        };
        let mut push = |group: (u8, usize), (h, w): (u64, u64), heads: usize, count: usize| {
            for _ in 0..count {
                for cross in [false, true] {
                    layers.push(AttentionLayer {
                        group,
                        grid_h: h,
                        grid_w: w,
                        heads: heads as u64,
                        cross,
                    });
                }
            }
        };
        for (level, block) in self.unet.down_blocks().iter().enumerate() {
            if block.kind == DownBlockKind::CrossAttn {
                let count = block.layers.saturating_mul(block.transformer_layers);
                push((0, level), grid(level), block.heads, count);
            }
        }
        let deepest = self.unet.block_count().saturating_sub(1);
        if let Some(mid) = self.unet.mid_block() {
            push(
                (1, deepest),
                grid(deepest),
                mid.heads,
                mid.transformer_layers,
            );
        }
        for (index, block) in self.unet.up_blocks().iter().enumerate() {
            if block.kind == UpBlockKind::CrossAttn {
                let level = deepest.saturating_sub(index);
                let count = block.layers.saturating_mul(block.transformer_layers);
                push((2, level), grid(level), block.heads, count);
            }
        }
        layers
    }
}

/// One attention layer of a UNet pass, for the estimate.
struct AttentionLayer {
    /// (place: 0 down, 1 mid, 2 up; level): the store keeps one map per group.
    group: (u8, usize),
    grid_h: u64,
    grid_w: u64,
    heads: u64,
    cross: bool,
}

impl AttentionLayer {
    fn cells(&self) -> u64 {
        self.grid_h.saturating_mul(self.grid_w)
    }
}

/// The estimated peak memory of a run, in bytes, by what needs it. Saturates at `u64::MAX`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunMemory {
    /// Image size the estimate is for, `(width_px, height_px)`.
    pub size_px: (usize, usize),
    /// Latents of every step (kept for the trajectory) and the working latents.
    pub latents: u64,
    /// The UNet's activations during one step (skips, the working tensors of the largest level,
    /// kernel buffers) and the attention probabilities a processor asks for.
    pub unet_activations: u64,
    /// The VAE decode of the final latents (or the pixel-space image), after the UNet is done.
    pub decode: u64,
    /// An attention store's maps (cross maps of every step, bounded self maps).
    pub attention_store: u64,
    /// A Prompt-to-Prompt replay recording (every step's attention).
    pub replay_recording: u64,
    /// True when the activations and the decode live in main memory (CPU device); otherwise only
    /// the attention store's maps do.
    pub activations_in_main_memory: bool,
}

impl RunMemory {
    /// Peak bytes: what the run keeps, plus the larger of one UNet step and the decode.
    pub fn total_bytes(&self) -> u64 {
        self.latents
            .saturating_add(self.attention_store)
            .saturating_add(self.replay_recording)
            .saturating_add(self.unet_activations.max(self.decode))
    }

    /// Peak bytes of main memory (all of it on the CPU; the store's maps on other devices).
    pub fn main_memory_bytes(&self) -> u64 {
        if self.activations_in_main_memory {
            self.total_bytes()
        } else {
            self.attention_store
        }
    }

    /// The parts, for messages: "UNet activations 1.2 GiB, VAE decode 3.4 GiB, ...".
    pub fn breakdown(&self) -> String {
        let parts = [
            ("latents", self.latents),
            ("UNet activations", self.unet_activations),
            ("decode", self.decode),
            ("attention store", self.attention_store),
            ("replay recording", self.replay_recording),
        ];
        parts
            .iter()
            .filter(|(_, bytes)| *bytes > 0)
            .map(|(what, bytes)| format!("{what} {}", format_bytes(*bytes)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Memory the machine has for a run, and where the number comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AvailableMemory {
    /// Bytes available.
    pub bytes: u64,
    /// Where the number comes from ("MemAvailable in /proc/meminfo", "assumed").
    pub source: String,
}

/// The memory available now: `MemAvailable` of `/proc/meminfo` on Linux, else
/// [`FALLBACK_AVAILABLE_BYTES`].
pub fn available_memory() -> AvailableMemory {
    let meminfo = Path::new("/proc/meminfo");
    match std::fs::read_to_string(meminfo)
        .ok()
        .and_then(|text| parse_mem_available(&text))
    {
        Some(bytes) => AvailableMemory {
            bytes,
            source: format!("MemAvailable in {}", meminfo.display()),
        },
        None => AvailableMemory {
            bytes: FALLBACK_AVAILABLE_BYTES,
            source: "assumed: the system does not report its available memory".to_string(),
        },
    }
}

/// `MemAvailable:  123 kB` of a `/proc/meminfo` text, in bytes.
pub fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo
        .lines()
        .find(|line| line.starts_with("MemAvailable:"))?;
    let mut fields = line.split_whitespace().skip(1);
    let value: u64 = fields.next()?.parse().ok()?;
    let unit = match fields.next() {
        Some("kB") | None => 1024,
        Some(_) => return None,
    };
    value.checked_mul(unit)
}

/// Estimates the peak memory of `request` on the model `footprint` describes, with `capture`
/// (see [`RunMemory`]). The size is taken as given (call it after the size checks of
/// [`check_request_limits`] for a meaningful number); every product saturates.
pub fn estimate_run_memory(
    footprint: &ModelFootprint,
    request: &GenerateRequest,
    capture: &RunCapture,
) -> RunMemory {
    let factor = footprint.latent_factor.max(1);
    let latent_h = request.height as u64 / factor;
    let latent_w = request.width as u64 / factor;
    let latent_cells = latent_h.saturating_mul(latent_w);
    let steps = request.steps as u64;
    let prompts = capture.prompt_count();
    let halves = if request.uses_guidance() { 2 } else { 1 };
    let batch = prompts.saturating_mul(halves);
    let unet = &footprint.unet;
    let activation = footprint.activation_bytes;

    let latent_channels = unet.in_channels as u64;
    let one_latent = latent_channels
        .saturating_mul(latent_cells)
        .saturating_mul(F32_BYTES);
    let latents = one_latent
        .saturating_mul(steps.saturating_add(4))
        .saturating_mul(prompts);

    // UNet: the skips of every down level, and the working tensors of the largest level.
    let level_cells = |level: usize| {
        let shift = level.min(63) as u32;
        (latent_h >> shift).saturating_mul(latent_w >> shift)
    };
    let first_channels = unet.block_out_channels.first().copied().unwrap_or(0) as u64;
    let mut skip_elements = first_channels.saturating_mul(latent_cells);
    let mut largest_level = 0u64;
    for (level, block) in unet.down_blocks().iter().enumerate() {
        let channels = block.out_channels as u64;
        let level_elements = channels.saturating_mul(level_cells(level));
        largest_level = largest_level.max(level_elements);
        skip_elements =
            skip_elements.saturating_add((block.layers as u64).saturating_mul(level_elements));
        if block.downsample {
            skip_elements =
                skip_elements.saturating_add(channels.saturating_mul(level_cells(level + 1)));
        }
    }
    let unet_elements = skip_elements
        .saturating_add(UNET_WORKING_TENSORS.saturating_mul(largest_level))
        .saturating_mul(batch);

    // Attention probabilities materialised for a processor: one layer at a time, scores and the
    // processor's result. A store alone no longer materialises them (the fused kernel hands it
    // head means), so for its runs this is an upper bound; edits' processors still do.
    let layers = footprint.attention_layers(latent_h, latent_w);
    let text_tokens = footprint.text_tokens as u64;
    let wants_probabilities = |layer: &AttentionLayer| {
        if layer.cross {
            capture.cross_tokens > 0 || capture.replay_self_max_queries.is_some()
        } else {
            let side = layer.grid_h.max(layer.grid_w);
            (capture.self_max_side > 0 && side <= capture.self_max_side as u64)
                || capture
                    .replay_self_max_queries
                    .is_some_and(|queries| layer.cells() <= queries as u64)
        }
    };
    let probabilities_of = |layer: &AttentionLayer| {
        let keys = if layer.cross {
            text_tokens
        } else {
            layer.cells()
        };
        layer
            .heads
            .saturating_mul(layer.cells())
            .saturating_mul(keys)
            .saturating_mul(F32_BYTES)
    };
    let largest_probabilities = layers
        .iter()
        .filter(|layer| wants_probabilities(layer))
        .map(|layer| {
            probabilities_of(layer)
                .saturating_mul(batch)
                .saturating_mul(2)
        })
        .max()
        .unwrap_or(0);
    let unet_activations = unet_elements
        .saturating_mul(activation)
        .saturating_add(KERNEL_BUFFER_BYTES)
        .saturating_add(largest_probabilities);

    let decode = decode_bytes(footprint, request, latent_cells);

    // The store: one cross map per (place, grid) group and step; self maps (latest and running
    // sum, plus the step's pending sum) per group up to the side.
    let mut groups: Vec<&AttentionLayer> = Vec::new();
    for layer in &layers {
        if !groups.iter().any(|seen| seen.group == layer.group) {
            groups.push(layer);
        }
    }
    let mut attention_store = 0u64;
    if capture.cross_tokens > 0 {
        let cells: u64 = groups
            .iter()
            .fold(0u64, |sum, group| sum.saturating_add(group.cells()));
        attention_store = cells
            .saturating_mul(capture.cross_tokens as u64)
            .saturating_mul(F32_BYTES)
            .saturating_mul(steps.saturating_add(1));
    }
    if capture.self_max_side > 0 {
        let self_cells_squared = groups
            .iter()
            .filter(|group| group.grid_h.max(group.grid_w) <= capture.self_max_side as u64)
            .fold(0u64, |sum, group| {
                sum.saturating_add(group.cells().saturating_mul(group.cells()))
            });
        attention_store =
            attention_store.saturating_add(self_cells_squared.saturating_mul(3 * F32_BYTES));
    }

    // The replay recording: the conditional half's attention, all heads, every step.
    let replay_recording = match capture.replay_self_max_queries {
        Some(self_max_queries) => {
            let per_step = layers
                .iter()
                .filter(|layer| layer.cross || layer.cells() <= self_max_queries as u64)
                .fold(0u64, |sum, layer| {
                    sum.saturating_add(probabilities_of(layer))
                });
            per_step.saturating_mul(steps)
        }
        None => 0,
    };

    RunMemory {
        size_px: (request.width, request.height),
        latents,
        unet_activations,
        decode,
        attention_store,
        replay_recording,
        activations_in_main_memory: footprint.on_cpu,
    }
}

/// Estimates the peak memory of a Style Aligned set of `images` images (a reference and its
/// targets) in one UNet batch: [`estimate_run_memory`] with `images` prompts and `capture` kept
/// per image, plus what sharing adds in the largest self-attention layer: each target's keys and
/// values with the reference's appended, its normalised queries and keys, the references' and
/// targets' outputs, and with `explicit_shift` (a score shift, computed with explicit
/// probabilities one item at a time) one item's `[heads, queries, 2 * keys]` logits and
/// probabilities; the shared group norms' `[own; reference]` pairs of the largest level.
pub fn estimate_style_set_memory(
    footprint: &ModelFootprint,
    request: &GenerateRequest,
    images: usize,
    capture: &RunCapture,
    explicit_shift: bool,
) -> RunMemory {
    let images = images.max(1);
    let per_image_store = RunCapture {
        prompts: images,
        ..*capture
    };
    let mut memory = estimate_run_memory(footprint, request, &per_image_store);
    // The stores: one per image.
    memory.attention_store = memory.attention_store.saturating_mul(images as u64);
    let factor = footprint.latent_factor.max(1);
    let latent_h = request.height as u64 / factor;
    let latent_w = request.width as u64 / factor;
    let halves: u64 = if request.uses_guidance() { 2 } else { 1 };
    let batch = (images as u64).saturating_mul(halves);
    let activation = footprint.activation_bytes;
    let mut largest_shared = 0u64;
    for layer in footprint
        .attention_layers(latent_h, latent_w)
        .iter()
        .filter(|layer| !layer.cross)
    {
        let channels = footprint
            .unet
            .block_out_channels
            .get(layer.group.1)
            .copied()
            .unwrap_or(0) as u64;
        let tokens = layer.cells();
        // Per item: q, k, v; keys and values doubled; normalised q, k; output: ~9 token tensors.
        let projections = tokens
            .saturating_mul(channels)
            .saturating_mul(9)
            .saturating_mul(batch)
            .saturating_mul(activation.max(F32_BYTES));
        let shifted = if explicit_shift {
            layer
                .heads
                .saturating_mul(tokens)
                .saturating_mul(tokens.saturating_mul(2))
                .saturating_mul(F32_BYTES)
                .saturating_mul(3)
        } else {
            0
        };
        largest_shared = largest_shared.max(projections.saturating_add(shifted));
    }
    let first_channels = footprint
        .unet
        .block_out_channels
        .first()
        .copied()
        .unwrap_or(0) as u64;
    let group_norm_pairs = first_channels
        .saturating_mul(latent_h.saturating_mul(latent_w))
        .saturating_mul(4)
        .saturating_mul(batch)
        .saturating_mul(F32_BYTES);
    memory.unet_activations = memory
        .unet_activations
        .saturating_add(largest_shared)
        .saturating_add(group_norm_pairs);
    memory
}

/// The VAE decode of the final latents: the working tensors of the decoder's largest level (each
/// up block's upsampled output keeps the block's channels at twice the side), plus the image.
fn decode_bytes(footprint: &ModelFootprint, request: &GenerateRequest, latent_cells: u64) -> u64 {
    let pixels = (request.width as u64).saturating_mul(request.height as u64);
    // The image as f32 `[3, h, w]`, scaled, clamped and permuted.
    let image = pixels.saturating_mul(3 * F32_BYTES).saturating_mul(3);
    let Some(vae) = &footprint.vae else {
        return image;
    };
    let channels: Vec<u64> = vae
        .block_out_channels
        .iter()
        .rev()
        .map(|&channels| channels as u64)
        .collect();
    let mut largest = 0u64;
    for (level, &level_channels) in channels.iter().enumerate() {
        let shift = (2 * level).min(63) as u32;
        let cells = latent_cells.saturating_mul(1u64 << shift);
        largest = largest.max(level_channels.saturating_mul(cells));
        if level + 1 < channels.len() {
            largest = largest.max(level_channels.saturating_mul(cells.saturating_mul(4)));
        }
    }
    VAE_WORKING_TENSORS
        .saturating_mul(largest)
        .saturating_mul(footprint.activation_bytes)
        .saturating_add(KERNEL_BUFFER_BYTES)
        .saturating_add(image)
}

/// Refuses a run whose estimated main memory exceeds `available`: the error names the size, the
/// estimate with its parts, the available memory and where that number comes from.
pub fn check_run_fits(memory: &RunMemory, available: &AvailableMemory) -> PipelineResult<()> {
    let needed = memory.main_memory_bytes();
    if needed <= available.bytes {
        return Ok(());
    }
    let (width, height) = memory.size_px;
    Err(PipelineError::TooLarge {
        what: format!("a {width}x{height} px run"),
        reason: format!(
            "it would need about {} ({}), this machine has {} available ({}); use a smaller size{}",
            format_bytes(needed),
            memory.breakdown(),
            format_bytes(available.bytes),
            available.source,
            if memory.attention_store > 0 || memory.replay_recording > 0 {
                ", fewer steps or less attention capture"
            } else {
                " or fewer steps"
            }
        ),
    })
}

/// Checks steps, guidance and size of `request` against the limits (see the module docs), with
/// overflow-safe arithmetic; `size_multiple` is the model's [`StableDiffusion::size_multiple_px`]
/// and `why_multiple` says where it comes from.
pub fn check_request_limits(
    request: &GenerateRequest,
    size_multiple: usize,
    why_multiple: &str,
) -> PipelineResult<()> {
    if request.steps == 0 || request.steps > MAX_STEPS {
        return Err(PipelineError::InvalidArgument {
            name: "steps",
            reason: format!(
                "{} steps requested; use 1 to {MAX_STEPS} (the schedulers' training schedule has 1000 timesteps)",
                request.steps
            ),
        });
    }
    if !request.guidance.is_finite() {
        return Err(PipelineError::InvalidArgument {
            name: "guidance",
            reason: format!(
                "{} is not a finite number; use 0 to {MAX_GUIDANCE} (values up to 1 turn guidance off)",
                request.guidance
            ),
        });
    }
    if !(0.0..=MAX_GUIDANCE).contains(&request.guidance) {
        return Err(PipelineError::InvalidArgument {
            name: "guidance",
            reason: format!(
                "{} is outside 0 to {MAX_GUIDANCE} (values up to 1 turn guidance off; larger scales \
                 push the noise prediction past f32 range and end in NaN)",
                format_number(request.guidance)
            ),
        });
    }
    let multiple = size_multiple.max(1);
    for (name, value) in [("width", request.width), ("height", request.height)] {
        if value > MAX_SIDE_PX {
            return Err(PipelineError::InvalidArgument {
                name,
                reason: format!("{value} px exceeds the largest supported side {MAX_SIDE_PX} px"),
            });
        }
        if value == 0 || !value.is_multiple_of(multiple) {
            let lower = (value / multiple) * multiple;
            let suggestion = if lower == 0 {
                format!("{multiple}")
            } else {
                format!("{lower} or {}", lower.saturating_add(multiple))
            };
            return Err(PipelineError::InvalidArgument {
                name,
                reason: format!(
                    "{value} px is not a positive multiple of {multiple} px ({why_multiple}); try {suggestion}"
                ),
            });
        }
    }
    Ok(())
}

/// Checks one guided UNet call (a batch of 2, as `attend bench unet` times) of a `width` x
/// `height` px image on `footprint`: the sides (positive multiples of `size_multiple`, at most
/// [`MAX_SIDE_PX`]) and the memory with `capture` against `available`.
pub fn check_unet_call(
    footprint: &ModelFootprint,
    (width, height): (usize, usize),
    size_multiple: usize,
    capture: &RunCapture,
    available: &AvailableMemory,
) -> PipelineResult<RunMemory> {
    let request = GenerateRequest {
        prompt: String::new(),
        negative_prompt: String::new(),
        seed: 0,
        steps: 1,
        guidance: 7.5,
        width,
        height,
        scheduler: None,
        init_latents: None,
        preview: false,
        inversion: None,
    };
    check_request_limits(&request, size_multiple, "the latent factor")?;
    let memory = estimate_run_memory(footprint, &request, capture);
    check_run_fits(&memory, available)?;
    Ok(memory)
}

/// `value` as the user would type it: "7.5", "-3", "1e300" (exponent form past a million).
fn format_number(value: f64) -> String {
    if value.abs() >= 1e6 {
        format!("{value:e}")
    } else {
        value.to_string()
    }
}

/// `bytes` as "12.3 GiB", "456 MiB", "789 KiB" or "12 B".
pub fn format_bytes(bytes: u64) -> String {
    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    // Display only: the rounding of the conversion does not matter.
    #[allow(clippy::cast_precision_loss)]
    let scaled = |unit: u64| bytes as f64 / unit as f64;
    if bytes == u64::MAX {
        "more than 16 EiB".to_string()
    } else if bytes >= GIB {
        format!("{:.1} GiB", scaled(GIB))
    } else if bytes >= MIB {
        format!("{:.0} MiB", scaled(MIB))
    } else if bytes >= KIB {
        format!("{:.0} KiB", scaled(KIB))
    } else {
        format!("{bytes} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_available_is_read_in_kibibytes() {
        let text = "MemTotal:  100 kB\nMemFree: 5 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(parse_mem_available(text), Some(2048 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: lots kB\n"), None);
        assert_eq!(
            parse_mem_available("MemAvailable: 18446744073709551615 kB\n"),
            None
        );
    }

    #[test]
    fn bytes_are_formatted_in_binary_units() {
        assert_eq!(format_bytes(12), "12 B");
        assert_eq!(format_bytes(3 << 20), "3 MiB");
        assert_eq!(format_bytes(3 << 29), "1.5 GiB");
        assert_eq!(format_bytes(u64::MAX), "more than 16 EiB");
    }
}

//! The canvas renderer: draws the image with the selected heat map blended over it, in
//! `shaders/heatmap.wgsl`, through an `egui_wgpu` paint callback.
//!
//! The heat grid is uploaded as an `R32Float` texture at its own (attention) resolution and upsampled
//! bilinearly in the shader; the image as `Rgba8Unorm`. Both carry a version number, and the GPU copy
//! is refreshed only when the version changes: changing the colormap, opacity or threshold writes the
//! 32-byte uniform buffer and nothing else.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use egui_wgpu::wgpu;

use crate::analysis::colormap::Colormap;

/// The shader source, embedded at build time.
pub const HEATMAP_SHADER: &str = include_str!("../../shaders/heatmap.wgsl");

/// Gives every [`CanvasImage`] / [`CanvasHeat`] a distinct version.
static NEXT_VERSION: AtomicU64 = AtomicU64::new(1);

fn next_version() -> u64 {
    NEXT_VERSION.fetch_add(1, Ordering::Relaxed)
}

/// The canvas image, `[height, width, 4]` RGBA bytes (sRGB-encoded, alpha ignored).
#[derive(Debug)]
pub struct CanvasImage {
    /// Changes whenever the pixels do.
    pub version: u64,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `[height, width, 4]` bytes.
    pub rgba: Vec<u8>,
}

impl CanvasImage {
    /// Converts `[height, width, 3]` RGB bytes, giving it a new version. `None` when the sizes
    /// disagree or are zero.
    pub fn from_rgb(width: usize, height: usize, rgb: &[u8]) -> Option<Self> {
        if width == 0 || height == 0 || rgb.len() != width * height * 3 {
            return None;
        }
        let rgba = rgb
            .chunks_exact(3)
            .flat_map(|pixel| [pixel[0], pixel[1], pixel[2], 255])
            .collect();
        Some(Self {
            version: next_version(),
            width: u32::try_from(width).ok()?,
            height: u32::try_from(height).ok()?,
            rgba,
        })
    }
}

/// The heat grid shown on the canvas, `[height, width]` values in 0..1.
#[derive(Debug)]
pub struct CanvasHeat {
    /// Changes whenever the values do.
    pub version: u64,
    /// Grid width.
    pub width: u32,
    /// Grid height.
    pub height: u32,
    /// `[height, width]` values.
    pub values: Vec<f32>,
}

impl CanvasHeat {
    /// Wraps a grid, giving it a new version. `None` when the sizes disagree or are zero.
    pub fn new(width: usize, height: usize, values: Vec<f32>) -> Option<Self> {
        if width == 0 || height == 0 || values.len() != width * height {
            return None;
        }
        Some(Self {
            version: next_version(),
            width: u32::try_from(width).ok()?,
            height: u32::try_from(height).ok()?,
            values,
        })
    }
}

/// Bits of [`HeatmapUniforms::flags`]. Keep in sync with `FLAG_*` in shaders/heatmap.wgsl.
pub mod flags {
    /// Draw the image.
    pub const SHOW_IMAGE: u32 = 1;
    /// Draw the heat map.
    pub const SHOW_HEAT: u32 = 2;
    /// Bilinear image magnification (else nearest, crisp pixels).
    pub const SMOOTH_IMAGE: u32 = 4;
    /// The framebuffer is sRGB: convert the output to linear.
    pub const LINEAR_OUTPUT: u32 = 8;
}

/// The shader's uniforms. Keep in sync with `struct Uniforms` in shaders/heatmap.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct HeatmapUniforms {
    /// Top-left of the visible part of the image, in 0..1 texture coordinates.
    pub uv_min: [f32; 2],
    /// Bottom-right of the visible part of the image.
    pub uv_max: [f32; 2],
    /// Weight of the colour-mapped heat over the image, 0..1.
    pub opacity: f32,
    /// Heat below this keeps the image's colour.
    pub threshold: f32,
    /// `Colormap as u32`.
    pub colormap: u32,
    /// [`flags`] bits.
    pub flags: u32,
}

impl HeatmapUniforms {
    /// Uniforms for the given view settings over the whole image.
    pub fn new(colormap: Colormap, opacity: f32, threshold: f32, flags: u32) -> Self {
        Self {
            uv_min: [0.0, 0.0],
            uv_max: [1.0, 1.0],
            opacity,
            threshold,
            colormap: colormap as u32,
            flags,
        }
    }
}

/// One GPU texture and the version of the data in it.
struct GpuTexture {
    texture: wgpu::Texture,
    view: wgpu::TextureView,
    version: u64,
}

/// How many times each kind of data went to the GPU (for tests and the frame-time log).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UploadCounts {
    /// Image uploads.
    pub image: u64,
    /// Heat grid uploads.
    pub heat: u64,
    /// Uniform buffer writes.
    pub uniforms: u64,
}

/// The renderer's GPU resources, kept in egui_wgpu's `callback_resources`.
pub struct HeatmapRenderer {
    pipeline: wgpu::RenderPipeline,
    bind_group_layout: wgpu::BindGroupLayout,
    uniform_buffer: wgpu::Buffer,
    image: GpuTexture,
    heat: GpuTexture,
    bind_group: wgpu::BindGroup,
    /// True when the framebuffer is sRGB (the shader then outputs linear colour).
    linear_output: bool,
    last_uniforms: Option<HeatmapUniforms>,
    uploads: UploadCounts,
}

impl HeatmapRenderer {
    /// Builds the pipeline for egui's render pass: `target_format` and `msaa_samples` must be the
    /// pass's (egui's defaults: no MSAA, so 1, and no depth buffer).
    pub fn new(
        device: &wgpu::Device,
        target_format: wgpu::TextureFormat,
        msaa_samples: u32,
    ) -> Self {
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("attend heatmap shader"),
            source: wgpu::ShaderSource::Wgsl(HEATMAP_SHADER.into()),
        });
        let texture_entry = |binding| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::FRAGMENT,
            ty: wgpu::BindingType::Texture {
                multisampled: false,
                sample_type: wgpu::TextureSampleType::Float { filterable: false },
                view_dimension: wgpu::TextureViewDimension::D2,
            },
            count: None,
        };
        let bind_group_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("attend heatmap bind group layout"),
            entries: &[
                wgpu::BindGroupLayoutEntry {
                    binding: 0,
                    visibility: wgpu::ShaderStages::VERTEX | wgpu::ShaderStages::FRAGMENT,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: false,
                        min_binding_size: wgpu::BufferSize::new(
                            std::mem::size_of::<HeatmapUniforms>() as u64,
                        ),
                    },
                    count: None,
                },
                texture_entry(1),
                texture_entry(2),
            ],
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("attend heatmap pipeline layout"),
            bind_group_layouts: &[Some(&bind_group_layout)],
            immediate_size: 0,
        });
        let pipeline = device.create_render_pipeline(&wgpu::RenderPipelineDescriptor {
            label: Some("attend heatmap pipeline"),
            layout: Some(&pipeline_layout),
            vertex: wgpu::VertexState {
                module: &module,
                entry_point: Some("vs_main"),
                buffers: &[],
                compilation_options: wgpu::PipelineCompilationOptions::default(),
            },
            primitive: wgpu::PrimitiveState::default(),
            depth_stencil: None,
            multisample: wgpu::MultisampleState {
                count: msaa_samples.max(1),
                mask: !0,
                alpha_to_coverage_enabled: false,
            },
            fragment: Some(wgpu::FragmentState {
                module: &module,
                entry_point: Some("fs_main"),
                targets: &[Some(wgpu::ColorTargetState {
                    format: target_format,
                    blend: None,
                    write_mask: wgpu::ColorWrites::ALL,
                })],
                compilation_options: wgpu::PipelineCompilationOptions::default(),
            }),
            multiview_mask: None,
            cache: None,
        });
        let uniform_buffer = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("attend heatmap uniforms"),
            size: std::mem::size_of::<HeatmapUniforms>() as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let image = create_texture(device, wgpu::TextureFormat::Rgba8Unorm, 1, 1, "image");
        let heat = create_texture(device, wgpu::TextureFormat::R32Float, 1, 1, "heat");
        let bind_group =
            create_bind_group(device, &bind_group_layout, &uniform_buffer, &image, &heat);
        Self {
            pipeline,
            bind_group_layout,
            uniform_buffer,
            image,
            heat,
            bind_group,
            linear_output: target_format.is_srgb(),
            last_uniforms: None,
            uploads: UploadCounts::default(),
        }
    }

    /// Builds the renderer for `render_state` and stores it in its callback resources.
    pub fn install(render_state: &egui_wgpu::RenderState) {
        let renderer = Self::new(&render_state.device, render_state.target_format, 1);
        render_state
            .renderer
            .write()
            .callback_resources
            .insert(renderer);
    }

    /// How often data went to the GPU so far.
    pub fn upload_counts(&self) -> UploadCounts {
        self.uploads
    }

    /// Uploads what changed: textures whose version differs, uniforms that differ.
    fn update(
        &mut self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        image: &CanvasImage,
        heat: &CanvasHeat,
        uniforms: HeatmapUniforms,
    ) {
        let mut rebind = false;
        if self.image.version != image.version {
            rebind |= upload(
                device,
                queue,
                &mut self.image,
                wgpu::TextureFormat::Rgba8Unorm,
                image.width,
                image.height,
                &image.rgba,
                image.version,
            );
            self.uploads.image += 1;
        }
        if self.heat.version != heat.version {
            let bytes: &[u8] = bytemuck::cast_slice(&heat.values);
            rebind |= upload(
                device,
                queue,
                &mut self.heat,
                wgpu::TextureFormat::R32Float,
                heat.width,
                heat.height,
                bytes,
                heat.version,
            );
            self.uploads.heat += 1;
        }
        if rebind {
            self.bind_group = create_bind_group(
                device,
                &self.bind_group_layout,
                &self.uniform_buffer,
                &self.image,
                &self.heat,
            );
        }
        let mut uniforms = uniforms;
        if self.linear_output {
            uniforms.flags |= flags::LINEAR_OUTPUT;
        }
        if self.last_uniforms != Some(uniforms) {
            queue.write_buffer(&self.uniform_buffer, 0, bytemuck::bytes_of(&uniforms));
            self.last_uniforms = Some(uniforms);
            self.uploads.uniforms += 1;
        }
    }
}

fn create_texture(
    device: &wgpu::Device,
    format: wgpu::TextureFormat,
    width: u32,
    height: u32,
    what: &str,
) -> GpuTexture {
    let texture = device.create_texture(&wgpu::TextureDescriptor {
        label: Some(&format!("attend heatmap {what} texture")),
        size: wgpu::Extent3d {
            width,
            height,
            depth_or_array_layers: 1,
        },
        mip_level_count: 1,
        sample_count: 1,
        dimension: wgpu::TextureDimension::D2,
        format,
        usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
        view_formats: &[],
    });
    let view = texture.create_view(&wgpu::TextureViewDescriptor::default());
    GpuTexture {
        texture,
        view,
        version: 0,
    }
}

/// Writes `bytes` into `target`, recreating it when the size changed. Returns true if recreated.
#[allow(clippy::too_many_arguments)]
fn upload(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    target: &mut GpuTexture,
    format: wgpu::TextureFormat,
    width: u32,
    height: u32,
    bytes: &[u8],
    version: u64,
) -> bool {
    let size = target.texture.size();
    let recreated = size.width != width || size.height != height;
    if recreated {
        *target = create_texture(device, format, width, height, "data");
    }
    let bytes_per_texel = format.block_copy_size(None).unwrap_or(4);
    queue.write_texture(
        wgpu::TexelCopyTextureInfo {
            texture: &target.texture,
            mip_level: 0,
            origin: wgpu::Origin3d::ZERO,
            aspect: wgpu::TextureAspect::All,
        },
        bytes,
        wgpu::TexelCopyBufferLayout {
            offset: 0,
            bytes_per_row: Some(width * bytes_per_texel),
            rows_per_image: Some(height),
        },
        wgpu::Extent3d {
            width,
            height,
            depth_or_array_layers: 1,
        },
    );
    target.version = version;
    recreated
}

fn create_bind_group(
    device: &wgpu::Device,
    layout: &wgpu::BindGroupLayout,
    uniform_buffer: &wgpu::Buffer,
    image: &GpuTexture,
    heat: &GpuTexture,
) -> wgpu::BindGroup {
    device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("attend heatmap bind group"),
        layout,
        entries: &[
            wgpu::BindGroupEntry {
                binding: 0,
                resource: uniform_buffer.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: wgpu::BindingResource::TextureView(&image.view),
            },
            wgpu::BindGroupEntry {
                binding: 2,
                resource: wgpu::BindingResource::TextureView(&heat.view),
            },
        ],
    })
}

/// One frame's canvas draw: the data (shared, versioned) and the uniforms.
pub struct HeatmapCallback {
    /// The image to draw.
    pub image: Arc<CanvasImage>,
    /// The heat grid to blend over it.
    pub heat: Arc<CanvasHeat>,
    /// View settings and the visible part of the image.
    pub uniforms: HeatmapUniforms,
}

impl egui_wgpu::CallbackTrait for HeatmapCallback {
    fn prepare(
        &self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        _screen_descriptor: &egui_wgpu::ScreenDescriptor,
        _egui_encoder: &mut wgpu::CommandEncoder,
        callback_resources: &mut egui_wgpu::CallbackResources,
    ) -> Vec<wgpu::CommandBuffer> {
        if let Some(renderer) = callback_resources.get_mut::<HeatmapRenderer>() {
            renderer.update(device, queue, &self.image, &self.heat, self.uniforms);
        }
        Vec::new()
    }

    fn paint(
        &self,
        _info: egui::PaintCallbackInfo,
        render_pass: &mut wgpu::RenderPass<'static>,
        callback_resources: &egui_wgpu::CallbackResources,
    ) {
        let Some(renderer) = callback_resources.get::<HeatmapRenderer>() else {
            return;
        };
        render_pass.set_pipeline(&renderer.pipeline);
        render_pass.set_bind_group(0, &renderer.bind_group, &[]);
        render_pass.draw(0..6, 0..1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shader's colormap tables, parsed from its source: `[table][stop] -> rgb`.
    fn shader_tables() -> Vec<(String, Vec<[f32; 3]>)> {
        let mut tables = Vec::new();
        for name in ["VIRIDIS", "INFERNO", "TURBO"] {
            let start = HEATMAP_SHADER
                .find(&format!("var<private> {name}"))
                .unwrap();
            let body = &HEATMAP_SHADER[start..];
            let body = &body[body.find('(').unwrap()..body.find(");").unwrap()];
            let stops: Vec<[f32; 3]> = body
                .split("vec3<f32>(")
                .skip(1)
                .map(|stop| {
                    let numbers: Vec<f32> = stop
                        .split(')')
                        .next()
                        .unwrap()
                        .split(',')
                        .map(|n| n.trim().parse().unwrap())
                        .collect();
                    [numbers[0], numbers[1], numbers[2]]
                })
                .collect();
            tables.push((name.to_owned(), stops));
        }
        tables
    }

    #[test]
    fn shader_colormaps_match_the_cpu_colormaps() {
        let tables = shader_tables();
        let maps = [Colormap::Viridis, Colormap::Inferno, Colormap::Turbo];
        for ((name, stops), colormap) in tables.iter().zip(maps) {
            assert_eq!(stops.len(), 33, "{name}");
            assert!(name.eq_ignore_ascii_case(colormap.name()));
            for (index, stop) in stops.iter().enumerate() {
                let cpu = colormap.rgb(index as f32 / 32.0);
                let gpu = stop.map(|value| value as u8);
                assert_eq!(cpu, gpu, "{name} stop {index}");
            }
        }
        // Colormap ids used by the shader's switch.
        assert_eq!(Colormap::Inferno as u32, 1);
        assert_eq!(Colormap::Turbo as u32, 2);
        assert_eq!(Colormap::Grey as u32, 3);
        assert!(HEATMAP_SHADER.contains("const COLORMAP_GREY: u32 = 3u;"));
    }

    #[test]
    fn uniform_layout_matches_the_shader() {
        assert_eq!(std::mem::size_of::<HeatmapUniforms>(), 32);
        for (flag, name) in [
            (flags::SHOW_IMAGE, "FLAG_SHOW_IMAGE"),
            (flags::SHOW_HEAT, "FLAG_SHOW_HEAT"),
            (flags::SMOOTH_IMAGE, "FLAG_SMOOTH_IMAGE"),
            (flags::LINEAR_OUTPUT, "FLAG_LINEAR_OUTPUT"),
        ] {
            assert!(
                HEATMAP_SHADER.contains(&format!("const {name}: u32 = {flag}u;")),
                "{name}"
            );
        }
    }
}

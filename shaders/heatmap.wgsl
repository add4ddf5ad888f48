// Heat map renderer: an attention grid colour-mapped and blended over the generated image.
//
// Contracts (keep in sync):
// - `Uniforms` <-> `HeatmapUniforms` in src/ui/heatmap_renderer.rs (same fields, same order, 32 bytes).
// - colormap ids and tables <-> `Colormap` in src/analysis/colormap.rs (33 stops per table, 0..255,
//   linear interpolation between stops; grey is t itself). A unit test compares the tables.
// - bilinear upsampling <-> `resize_bilinear` in src/analysis/heatmap.rs (align_corners = false,
//   edges clamped), so the GPU canvas matches the CPU exports.
//
// The heat grid is an R32Float texture read with textureLoad (R32Float is not filterable everywhere),
// interpolated here. The image is an Rgba8Unorm texture holding sRGB-encoded bytes: blending happens
// in sRGB space like the CPU `overlay`, and is converted to linear only for an sRGB framebuffer.

struct Uniforms {
    // The part of the image (in 0..1 texture coordinates) that the viewport shows.
    uv_min: vec2<f32>,
    uv_max: vec2<f32>,
    // Weight of the colour-mapped heat over the image, 0..1.
    opacity: f32,
    // Heat below this keeps the image's colour.
    threshold: f32,
    // 0 viridis, 1 inferno, 2 turbo, 3 grey.
    colormap: u32,
    // FLAG_* bits.
    flags: u32,
};

const FLAG_SHOW_IMAGE: u32 = 1u;
const FLAG_SHOW_HEAT: u32 = 2u;
const FLAG_SMOOTH_IMAGE: u32 = 4u;
const FLAG_LINEAR_OUTPUT: u32 = 8u;

const COLORMAP_INFERNO: u32 = 1u;
const COLORMAP_TURBO: u32 = 2u;
const COLORMAP_GREY: u32 = 3u;
const LAST_STOP: u32 = 32u;

@group(0) @binding(0) var<uniform> uniforms: Uniforms;
@group(0) @binding(1) var image_texture: texture_2d<f32>;
@group(0) @binding(2) var heat_texture: texture_2d<f32>;

var<private> VIRIDIS: array<vec3<f32>, 33> = array<vec3<f32>, 33>(
    vec3<f32>(68.0, 1.0, 84.0), vec3<f32>(71.0, 13.0, 96.0), vec3<f32>(72.0, 24.0, 106.0), vec3<f32>(72.0, 35.0, 116.0),
    vec3<f32>(71.0, 45.0, 123.0), vec3<f32>(69.0, 54.0, 129.0), vec3<f32>(66.0, 64.0, 134.0), vec3<f32>(63.0, 73.0, 137.0),
    vec3<f32>(59.0, 82.0, 139.0), vec3<f32>(55.0, 90.0, 141.0), vec3<f32>(51.0, 99.0, 141.0), vec3<f32>(47.0, 106.0, 142.0),
    vec3<f32>(44.0, 114.0, 142.0), vec3<f32>(41.0, 122.0, 142.0), vec3<f32>(38.0, 129.0, 142.0), vec3<f32>(35.0, 137.0, 142.0),
    vec3<f32>(33.0, 144.0, 140.0), vec3<f32>(31.0, 152.0, 139.0), vec3<f32>(31.0, 159.0, 136.0), vec3<f32>(33.0, 166.0, 133.0),
    vec3<f32>(40.0, 174.0, 128.0), vec3<f32>(49.0, 181.0, 123.0), vec3<f32>(62.0, 188.0, 116.0), vec3<f32>(76.0, 194.0, 108.0),
    vec3<f32>(93.0, 201.0, 99.0), vec3<f32>(110.0, 206.0, 88.0), vec3<f32>(130.0, 211.0, 76.0), vec3<f32>(150.0, 216.0, 63.0),
    vec3<f32>(171.0, 220.0, 50.0), vec3<f32>(192.0, 223.0, 36.0), vec3<f32>(213.0, 226.0, 26.0), vec3<f32>(234.0, 229.0, 26.0),
    vec3<f32>(253.0, 231.0, 37.0),
);

var<private> INFERNO: array<vec3<f32>, 33> = array<vec3<f32>, 33>(
    vec3<f32>(0.0, 0.0, 4.0), vec3<f32>(4.0, 3.0, 18.0), vec3<f32>(11.0, 7.0, 36.0), vec3<f32>(21.0, 11.0, 55.0),
    vec3<f32>(33.0, 12.0, 74.0), vec3<f32>(46.0, 10.0, 90.0), vec3<f32>(60.0, 9.0, 101.0), vec3<f32>(74.0, 12.0, 107.0),
    vec3<f32>(87.0, 16.0, 109.0), vec3<f32>(99.0, 20.0, 110.0), vec3<f32>(112.0, 25.0, 110.0), vec3<f32>(125.0, 30.0, 109.0),
    vec3<f32>(137.0, 34.0, 106.0), vec3<f32>(150.0, 39.0, 102.0), vec3<f32>(163.0, 43.0, 97.0), vec3<f32>(175.0, 49.0, 92.0),
    vec3<f32>(187.0, 55.0, 85.0), vec3<f32>(198.0, 62.0, 77.0), vec3<f32>(209.0, 70.0, 68.0), vec3<f32>(219.0, 79.0, 59.0),
    vec3<f32>(227.0, 89.0, 50.0), vec3<f32>(235.0, 101.0, 40.0), vec3<f32>(241.0, 113.0, 30.0), vec3<f32>(246.0, 127.0, 20.0),
    vec3<f32>(249.0, 141.0, 10.0), vec3<f32>(251.0, 156.0, 6.0), vec3<f32>(252.0, 171.0, 15.0), vec3<f32>(251.0, 186.0, 31.0),
    vec3<f32>(249.0, 202.0, 50.0), vec3<f32>(245.0, 217.0, 73.0), vec3<f32>(242.0, 232.0, 101.0), vec3<f32>(243.0, 245.0, 134.0),
    vec3<f32>(252.0, 255.0, 164.0),
);

var<private> TURBO: array<vec3<f32>, 33> = array<vec3<f32>, 33>(
    vec3<f32>(48.0, 18.0, 59.0), vec3<f32>(57.0, 42.0, 115.0), vec3<f32>(64.0, 64.0, 161.0), vec3<f32>(68.0, 86.0, 199.0),
    vec3<f32>(70.0, 107.0, 227.0), vec3<f32>(70.0, 127.0, 246.0), vec3<f32>(66.0, 147.0, 255.0), vec3<f32>(55.0, 167.0, 250.0),
    vec3<f32>(41.0, 187.0, 236.0), vec3<f32>(29.0, 205.0, 216.0), vec3<f32>(24.0, 220.0, 195.0), vec3<f32>(30.0, 232.0, 176.0),
    vec3<f32>(49.0, 242.0, 153.0), vec3<f32>(76.0, 249.0, 126.0), vec3<f32>(107.0, 253.0, 100.0), vec3<f32>(138.0, 255.0, 77.0),
    vec3<f32>(163.0, 253.0, 60.0), vec3<f32>(184.0, 247.0, 53.0), vec3<f32>(204.0, 237.0, 52.0), vec3<f32>(222.0, 224.0, 55.0),
    vec3<f32>(237.0, 208.0, 58.0), vec3<f32>(248.0, 192.0, 58.0), vec3<f32>(253.0, 174.0, 53.0), vec3<f32>(254.0, 152.0, 44.0),
    vec3<f32>(251.0, 128.0, 34.0), vec3<f32>(245.0, 104.0, 23.0), vec3<f32>(236.0, 82.0, 15.0), vec3<f32>(224.0, 64.0, 9.0),
    vec3<f32>(210.0, 49.0, 5.0), vec3<f32>(192.0, 35.0, 2.0), vec3<f32>(172.0, 23.0, 1.0), vec3<f32>(149.0, 13.0, 1.0),
    vec3<f32>(122.0, 4.0, 3.0),
);

struct VertexOut {
    @builtin(position) position: vec4<f32>,
    @location(0) uv: vec2<f32>,
};

// Two triangles covering the viewport (the callback's rect), no vertex buffer.
@vertex
fn vs_main(@builtin(vertex_index) vertex_index: u32) -> VertexOut {
    var corners = array<vec2<f32>, 6>(
        vec2<f32>(0.0, 0.0), vec2<f32>(1.0, 0.0), vec2<f32>(0.0, 1.0),
        vec2<f32>(0.0, 1.0), vec2<f32>(1.0, 0.0), vec2<f32>(1.0, 1.0),
    );
    let corner = corners[vertex_index];
    var out: VertexOut;
    out.position = vec4<f32>(corner.x * 2.0 - 1.0, 1.0 - corner.y * 2.0, 0.0, 1.0);
    out.uv = mix(uniforms.uv_min, uniforms.uv_max, corner);
    return out;
}

// Texel indices and weights for bilinear sampling at `uv` (align_corners = false, clamped edges).
struct Taps {
    low: vec2<i32>,
    high: vec2<i32>,
    fraction: vec2<f32>,
};

fn bilinear_taps(uv: vec2<f32>, size: vec2<i32>) -> Taps {
    let position = max(uv * vec2<f32>(size) - vec2<f32>(0.5), vec2<f32>(0.0));
    let low = min(vec2<i32>(floor(position)), size - vec2<i32>(1));
    var taps: Taps;
    taps.low = low;
    taps.high = min(low + vec2<i32>(1), size - vec2<i32>(1));
    taps.fraction = position - vec2<f32>(low);
    return taps;
}

fn heat_at(uv: vec2<f32>) -> f32 {
    let taps = bilinear_taps(uv, vec2<i32>(textureDimensions(heat_texture)));
    let top = mix(
        textureLoad(heat_texture, taps.low, 0).r,
        textureLoad(heat_texture, vec2<i32>(taps.high.x, taps.low.y), 0).r,
        taps.fraction.x,
    );
    let bottom = mix(
        textureLoad(heat_texture, vec2<i32>(taps.low.x, taps.high.y), 0).r,
        textureLoad(heat_texture, taps.high, 0).r,
        taps.fraction.x,
    );
    return mix(top, bottom, taps.fraction.y);
}

fn image_at(uv: vec2<f32>) -> vec3<f32> {
    let size = vec2<i32>(textureDimensions(image_texture));
    if (uniforms.flags & FLAG_SMOOTH_IMAGE) == 0u {
        let texel = clamp(vec2<i32>(floor(uv * vec2<f32>(size))), vec2<i32>(0), size - vec2<i32>(1));
        return textureLoad(image_texture, texel, 0).rgb;
    }
    let taps = bilinear_taps(uv, size);
    let top = mix(
        textureLoad(image_texture, taps.low, 0).rgb,
        textureLoad(image_texture, vec2<i32>(taps.high.x, taps.low.y), 0).rgb,
        taps.fraction.x,
    );
    let bottom = mix(
        textureLoad(image_texture, vec2<i32>(taps.low.x, taps.high.y), 0).rgb,
        textureLoad(image_texture, taps.high, 0).rgb,
        taps.fraction.x,
    );
    return mix(top, bottom, taps.fraction.y);
}

// The colour of heat `t` (clamped to 0..1), sRGB-encoded in 0..1.
fn colormap_rgb(colormap: u32, t: f32) -> vec3<f32> {
    let value = clamp(t, 0.0, 1.0);
    if colormap == COLORMAP_GREY {
        return vec3<f32>(value);
    }
    let position = value * f32(LAST_STOP);
    let low = min(u32(floor(position)), LAST_STOP - 1u);
    let fraction = position - f32(low);
    var from_stop: vec3<f32>;
    var to_stop: vec3<f32>;
    switch colormap {
        case COLORMAP_INFERNO: {
            from_stop = INFERNO[low];
            to_stop = INFERNO[low + 1u];
        }
        case COLORMAP_TURBO: {
            from_stop = TURBO[low];
            to_stop = TURBO[low + 1u];
        }
        default: {
            from_stop = VIRIDIS[low];
            to_stop = VIRIDIS[low + 1u];
        }
    }
    return mix(from_stop, to_stop, fraction) / 255.0;
}

fn srgb_to_linear(colour: vec3<f32>) -> vec3<f32> {
    let low = colour / 12.92;
    let high = pow((colour + vec3<f32>(0.055)) / 1.055, vec3<f32>(2.4));
    return select(high, low, colour <= vec3<f32>(0.04045));
}

@fragment
fn fs_main(in: VertexOut) -> @location(0) vec4<f32> {
    let show_image = (uniforms.flags & FLAG_SHOW_IMAGE) != 0u;
    var colour = vec3<f32>(0.0);
    if show_image {
        colour = image_at(in.uv);
    }
    if (uniforms.flags & FLAG_SHOW_HEAT) != 0u {
        let heat = heat_at(in.uv);
        if heat >= uniforms.threshold {
            // Without the image underneath, the heat map is shown at full strength.
            let opacity = select(1.0, clamp(uniforms.opacity, 0.0, 1.0), show_image);
            colour = mix(colour, colormap_rgb(uniforms.colormap, heat), opacity);
        }
    }
    if (uniforms.flags & FLAG_LINEAR_OUTPUT) != 0u {
        colour = srgb_to_linear(colour);
    }
    return vec4<f32>(colour, 1.0);
}

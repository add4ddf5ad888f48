#!/usr/bin/env bash
# Regenerates the editor screenshots in screenshots/ from the real window, and measures frame times.
#
# Runs `attend --prompt ... --generate` under Xvfb (and once with a real image, ATTEND_IMAGE, and
# once in Appearance transfer mode, ATTEND_SCREENSHOT_STRUCTURE / _APPEARANCE) (wgpu on lavapipe, Mesa's software Vulkan). The
# editor itself captures its window once the run has finished (ATTEND_SCREENSHOT, see
# src/ui/screenshot.rs `ScreenshotPlan::from_environment`) and quits; ATTEND_FRAME_TIMES logs the build time
# of every frame, and the p50/p99 summary is printed at exit.
#
# Needs: xvfb, mesa-vulkan-drivers (and imagemagick for the optional full-screen capture):
#   apt-get install -y xvfb mesa-vulkan-drivers imagemagick
# Usage: scripts/screenshots.sh [path/to/attend]   (default: builds and uses target/debug/attend)
set -euo pipefail
cd "$(dirname "$0")/.."

binary="${1:-}"
if [[ -z "$binary" ]]; then
    cargo build --bin attend
    binary=target/debug/attend
fi
out=screenshots
mkdir -p "$out"

display=":${ATTEND_XVFB_DISPLAY:-97}"
Xvfb "$display" -screen 0 1400x900x24 -nolisten tcp &
xvfb_pid=$!
runtime_dir="$(mktemp -d)"
cleanup() {
    kill "$xvfb_pid" 2>/dev/null || true
    rm -rf "$runtime_dir"
}
trap cleanup EXIT
sleep 1
export DISPLAY="$display" XDG_RUNTIME_DIR="$runtime_dir" WGPU_BACKEND=vulkan
# Keep the user's persisted settings out of the pictures.
export XDG_DATA_HOME="$runtime_dir/data" XDG_CONFIG_HOME="$runtime_dir/config"

prompt="${ATTEND_SCREENSHOT_PROMPT:-a red circle and a blue square}"
seed="${ATTEND_SCREENSHOT_SEED:-0}"

shot() {
    local name="$1"
    shift
    echo "== $name"
    env ATTEND_SCREENSHOT="$out/$name.png" ATTEND_FRAME_TIMES="$runtime_dir/$name.frame-times.csv" "$@" \
        timeout 900 "$binary" --prompt "$prompt" --seed "$seed" --generate
}

# The word heat map of "circle" over the image, thumbnails for every word.
shot editor-word env ATTEND_SCREENSHOT_WORD=circle
# During a run (step 8 of 20): the live preview and the heat map of "circle" so far.
shot editor-running env ATTEND_SCREENSHOT_AT_STEP=8 ATTEND_SCREENSHOT_WORD=circle
# The self-attention probe on the square.
shot editor-probe env ATTEND_SCREENSHOT_PROBE=0.75,0.4
# The Segments view with the segment at that point selected (its mask previewed).
shot editor-segments env ATTEND_SCREENSHOT_SEGMENTS=0.75,0.52
# Edit mode: "circle -> square" swapped by Prompt-to-Prompt, source | edited side by side.
shot editor-edit env ATTEND_SCREENSHOT_EDIT="a red square and a blue square"

# Style set mode: the reference (a red circle on a yellow background) and three targets that name
# no background, generated as one set sharing the reference's style; the first target is selected:
# its word maps beside the reference's above the canvas, its heat map of "square" on the canvas.
echo "== style-set"
env ATTEND_SCREENSHOT="$out/style-set.png" ATTEND_FRAME_TIMES="$runtime_dir/style-set.frame-times.csv" \
    ATTEND_SCREENSHOT_STYLE="${ATTEND_SCREENSHOT_STYLE_TARGETS:-a blue square|a green triangle|a purple star}" \
    ATTEND_SCREENSHOT_WORD=square \
    timeout 900 "$binary" --prompt "a red circle on a yellow background" --seed "$seed" --generate

# A real image being edited: one of attend's drawn scenes (seed 30, "a blue square and a purple
# circle") opened with ATTEND_IMAGE, described by its caption, inverted, replayed, and its circle
# swapped for a star by Prompt-to-Prompt (source | edited side by side).
scene_dir="$runtime_dir/scene"
"$binary" scenes --count 1 --start 30 --size 64 --out "$scene_dir" >/dev/null
scene_caption="$(sed -n 's/.*"caption":"\([^"]*\)".*/\1/p' "$scene_dir/scenes.jsonl")"
echo "== real-image-edit (image: $scene_caption)"
env ATTEND_SCREENSHOT="$out/real-image-edit.png" ATTEND_FRAME_TIMES="$runtime_dir/real-image-edit.frame-times.csv" \
    ATTEND_IMAGE="$scene_dir/images/0000030.png" \
    ATTEND_SCREENSHOT_EDIT="${scene_caption/circle/star}" \
    timeout 900 "$binary" --prompt "$scene_caption" --seed "$seed" --generate

# Appearance transfer: a drawn scene's layout (seed 3, a black circle bottom right on green) in
# another scene's look (seed 33, a yellow circle top right on black), both scenes the bundled model
# never saw; the correspondence probe on the output's circle shows where it attends in the
# appearance image.
pair_dir="$runtime_dir/pair"
"$binary" scenes --count 1 --start 3 --size 64 --out "$pair_dir/structure" >/dev/null
"$binary" scenes --count 1 --start 33 --size 64 --out "$pair_dir/appearance" >/dev/null
caption_of() { sed -n 's/.*"caption":"\([^"]*\)".*/\1/p' "$1/scenes.jsonl"; }
echo "== appearance-transfer"
env ATTEND_SCREENSHOT="$out/appearance-transfer.png" \
    ATTEND_FRAME_TIMES="$runtime_dir/appearance-transfer.frame-times.csv" \
    ATTEND_SCREENSHOT_STRUCTURE="$pair_dir/structure/images/0000003.png" \
    ATTEND_SCREENSHOT_STRUCTURE_PROMPT="$(caption_of "$pair_dir/structure")" \
    ATTEND_SCREENSHOT_APPEARANCE="$pair_dir/appearance/images/0000033.png" \
    ATTEND_SCREENSHOT_APPEARANCE_PROMPT="$(caption_of "$pair_dir/appearance")" \
    ATTEND_SCREENSHOT_APPEARANCE_STEPS="${ATTEND_SCREENSHOT_APPEARANCE_STEPS:-20}" \
    ATTEND_SCREENSHOT_PROBE=0.78,0.68 \
    timeout 900 "$binary"

# Frame times while the weight slider of "square" is dragged in edit mode (60 positions, one per
# frame; each position restarts the edited branch): the summary is printed, the picture not kept.
echo "== drag (frame times only)"
env ATTEND_SCREENSHOT="$runtime_dir/drag.png" ATTEND_FRAME_TIMES="$runtime_dir/drag.frame-times.csv" \
    ATTEND_SCREENSHOT_EDIT="a red square and a blue square" ATTEND_SCREENSHOT_DRAG=square \
    timeout 900 "$binary" --prompt "$prompt" --seed "$seed" --generate

for csv in "$runtime_dir"/*.frame-times.csv; do
    sort -n "$csv" | awk -v name="$(basename "$csv")" '
        { t[NR] = $1 }
        END {
            p50 = t[int((NR - 1) * 0.50 + 0.5) + 1]; p99 = t[int((NR - 1) * 0.99 + 0.5) + 1];
            printf "%s: %d frames, build time p50 %.2f ms, p99 %.2f ms, max %.2f ms\n", name, NR, p50, p99, t[NR]
        }'
done


#!/bin/bash
# attend against diffusers on the bundled model's UNet (assets/attend-shapes, its fp16 weights
# loaded as fp32): one call with a CFG batch of 2, 64x64 pixels, attend with attention capture on,
# both on 2 threads, alternating in the same run, several rounds; prints each round's ratio and the
# load average. Needs a release build and python with torch + diffusers.
# attend's products: PRODUCTS=bf16 (the bundled model's default) or f32 (the reference).
# Usage: [ITERS=10] [PRODUCTS=bf16|f32] scripts/bench_bundled_ab.sh [path/to/attend] [rounds] [python]
set -u
cd "$(dirname "$0")/.."
attend=${1:-target/release/attend}
rounds=${2:-5}
python=${3:-python3}
iters=${ITERS:-10}
products=${PRODUCTS:-bf16}
ratios=()
for round in $(seq "$rounds"); do
  ours=$(RAYON_NUM_THREADS=2 "$attend" bench unet --model assets/attend-shapes --width 64 --height 64 \
    --iters $iters --capture --products "$products" --json 2>/dev/null)
  load_ours=$(cut -d' ' -f1 /proc/loadavg)
  theirs=$("$python" scripts/bench_diffusers_unet.py 64 $iters --model assets/attend-shapes --threads 2 2>/dev/null)
  load_theirs=$(cut -d' ' -f1 /proc/loadavg)
  ours_secs=$(sed -E 's/.*"unet_step_secs":([0-9.e-]+).*/\1/' <<<"$ours")
  theirs_secs=$(sed -E 's/.*"diffusers_unet_secs": ([0-9.e-]+).*/\1/' <<<"$theirs")
  ratio=$(awk -v a="$ours_secs" -v b="$theirs_secs" 'BEGIN { printf "%.2f", a / b }')
  ratios+=("$ratio")
  echo "pass $round: attend ($products products) ${ours_secs} s (load $load_ours), diffusers ${theirs_secs} s (load $load_theirs), ratio ${ratio}x"
done
sorted=$(printf '%s\n' "${ratios[@]}" | sort -n)
echo "ratios: $(tr '\n' ' ' <<<"$sorted")median $(sed -n "$(( (rounds + 1) / 2 ))p" <<<"$sorted")x"

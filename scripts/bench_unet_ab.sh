#!/bin/bash
# attend (capture off, then on) vs diffusers, one SD 1.5 UNet call (random weights, CFG batch 2,
# fp32, CPU, 2 threads), alternating, PASSES passes (default two), 256 and 512 px; then one VAE
# decode at 512 px (random weights, batch 1) per pass. Needs a release build and python with
# torch + diffusers.
# Usage: [PASSES=n] scripts/bench_unet_ab.sh [path/to/attend] [python]
set -u
cd "$(dirname "$0")/.."
attend=${1:-target/release/attend}
python=${2:-python3}
for pass in $(seq 1 "${PASSES:-2}"); do
  for size in 256 512; do
    iters=$([ "$size" = 256 ] && echo 8 || echo 4)
    for capture in "" --capture; do
      echo "pass $pass attend $size: $("$attend" bench unet --random-weights tests/fixtures/manifests/sd15.json --width $size --height $size --iters $iters --json $capture) load $(cut -d' ' -f1 /proc/loadavg)"
    done
    echo "pass $pass diffusers $size: $("$python" scripts/bench_diffusers_unet.py $size $iters) load $(cut -d' ' -f1 /proc/loadavg)"
  done
  echo "pass $pass attend vae 512: $("$attend" bench vae --random-weights tests/fixtures/manifests/sd15.json --width 512 --height 512 --iters 2 --json) load $(cut -d' ' -f1 /proc/loadavg)"
  echo "pass $pass diffusers vae 512: $("$python" scripts/bench_diffusers_vae.py 512 2) load $(cut -d' ' -f1 /proc/loadavg)"
done

#!/bin/bash
# Two attend builds on the same UNet benchmarks, alternating, three passes: the bundled model at
# 64 px (attention capture off and on) and the SD 1.5 UNet with random weights at 256 px (capture
# on). Only back-to-back pairs compare: the machine's speed drifts.
# Usage: scripts/bench_before_after.sh path/to/attend-before path/to/attend-after
set -u
cd "$(dirname "$0")/.."
before=$1
after=$2
bundled="--model assets/attend-shapes --width 64 --height 64 --iters 10 --json"
sd15="--random-weights tests/fixtures/manifests/sd15.json --width 256 --height 256 --iters 4 --json --capture"
for pass in 1 2 3; do
  for name in before after; do
    binary=$([ "$name" = before ] && echo "$before" || echo "$after")
    # shellcheck disable=SC2086
    {
      echo "pass $pass $name bundled capture-off: $("$binary" bench unet $bundled 2>/dev/null) load $(cut -d' ' -f1 /proc/loadavg)"
      echo "pass $pass $name bundled capture-on: $("$binary" bench unet $bundled --capture 2>/dev/null) load $(cut -d' ' -f1 /proc/loadavg)"
      echo "pass $pass $name sd15-256 capture-on: $("$binary" bench unet $sd15 2>/dev/null) load $(cut -d' ' -f1 /proc/loadavg)"
    }
  done
done

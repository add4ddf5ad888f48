#!/bin/bash
# The grounding fine-tune of attend-shapes v4 on a CUDA machine (see README.md), from the committed
# weights in assets/attend-shapes. Data: `attend scenes --count 80000 --start 1000000 --format raw`,
# each file xz-compressed into $DATA_XZ (default .train/v4), small enough to copy to the machine.
# A second run on the same machine with the same $WORK continues from $WORK/state.
set -eo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out-v4}; mkdir -p "$OUT"
WORK=${WORK:-/tmp/attend-shapes-v4}; mkdir -p "$WORK/data"
MINUTES=${MINUTES:-7}
BATCH=${BATCH:-256}
EXTRA=${EXTRA:-}
if [ -d .whl ] && ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
(nvidia-smi --query-gpu=name,memory.total --format=csv || true) | tee "$OUT/log_v4.txt"
python3 - "$WORK/data" "${DATA_XZ:-.train/v4}" <<'PY'
import lzma, shutil, sys, time
start = time.time()
for name in ["images.u8", "objects.u8", "captions.txt"]:
    with lzma.open(f"{sys.argv[2]}/{name}.xz") as src, open(f"{sys.argv[1]}/{name}", "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 24)
print(f"data unpacked in {time.time() - start:.1f}s", flush=True)
PY
python3 training/train.py --data "$WORK/data" --state "$WORK/state" --export "$WORK/export" \
  --init-from assets/attend-shapes --grounding 0.005 --batch "$BATCH" --lr 1e-4 --warmup 50 --ema 0.999 \
  --minutes "$MINUTES" --plan-minutes "${PLAN_MINUTES:-$MINUTES}" --checkpoint-minutes 1000 --log-every 100 \
  --multi-object-weight 2 --samples "$OUT/attend-shapes-v4_samples.png" $EXTRA 2>&1 | tee -a "$OUT/log_v4.txt"
cd "$WORK" && tar cf export.tar export && split -b 15000000 export.tar "$OUT/export.tar.part-"
ls -la "$OUT"

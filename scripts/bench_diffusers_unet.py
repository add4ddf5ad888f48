"""Median wall time of one SD 1.5 UNet call (random weights, CFG batch 2, fp32, CPU) in diffusers,
the counterpart of `attend bench unet --random-config tests/fixtures/manifests/sd15.json`."""
import json, sys, time
import torch
from diffusers import UNet2DConditionModel
size = int(sys.argv[1]); iters = int(sys.argv[2])
config = json.load(open("tests/fixtures/manifests/sd15.json"))["configs"]["unet"]
torch.manual_seed(0)
unet = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
sample = torch.randn(2, 4, size // 8, size // 8)
context = torch.randn(2, 77, 768)
times = []
with torch.no_grad():
    for i in range(iters + 1):
        start = time.perf_counter()
        unet(sample, 500, encoder_hidden_states=context)
        if i > 0:
            times.append(time.perf_counter() - start)
times.sort()
print(json.dumps({"diffusers_unet_secs": times[len(times) // 2], "size": size, "iters": iters,
                  "torch": torch.__version__, "threads": torch.get_num_threads()}))

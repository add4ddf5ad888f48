"""Median wall time of one UNet call (CFG batch 2, fp32, CPU, 2 threads) in diffusers, the
counterpart of `attend bench unet`.

Usage:
  bench_diffusers_unet.py SIZE ITERS                  SD 1.5's UNet with random weights (the
                                                      counterpart of `--random-weights
                                                      tests/fixtures/manifests/sd15.json`)
  bench_diffusers_unet.py SIZE ITERS --model DIR      the UNet of a diffusers folder (an fp16 file
                                                      is loaded as fp32), SIZE in pixels
  bench_diffusers_unet.py SIZE ITERS --paced          as `attend bench unet --paced`: "ready" after
                                                      the warm-up call, then one timed call per line
                                                      read from standard input, its seconds printed
"""
import argparse, json, sys, time
import torch
from diffusers import UNet2DConditionModel

parser = argparse.ArgumentParser()
parser.add_argument("size", type=int, help="image size in pixels")
parser.add_argument("iters", type=int, help="timed calls after one warm-up call")
parser.add_argument("--model", help="diffusers model folder (default: SD 1.5 with random weights)")
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--paced", action="store_true", help="one timed call per line of standard input")
args = parser.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)
if args.model:
    unet_dir = f"{args.model}/unet"
    import os
    variant = None if os.path.exists(f"{unet_dir}/diffusion_pytorch_model.safetensors") else "fp16"
    unet = UNet2DConditionModel.from_pretrained(unet_dir, variant=variant, torch_dtype=torch.float32).eval()
    latent_factor = 2 ** (len(json.load(open(f"{args.model}/vae/config.json"))["block_out_channels"]) - 1) \
        if os.path.exists(f"{args.model}/vae/config.json") else 1
else:
    config = json.load(open("tests/fixtures/manifests/sd15.json"))["configs"]["unet"]
    unet = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    latent_factor = 8
cross = unet.config.cross_attention_dim
sample = torch.randn(2, unet.config.in_channels, args.size // latent_factor, args.size // latent_factor)
context = torch.randn(2, 77, cross if isinstance(cross, int) else cross[0])
times = []
with torch.no_grad():
    for i in range(args.iters + 1):
        if args.paced and i > 0:
            if i == 1:
                print("ready", flush=True)
            if not sys.stdin.readline():
                break
        start = time.perf_counter()
        unet(sample, 500, encoder_hidden_states=context)
        if i > 0:
            times.append(time.perf_counter() - start)
            if args.paced:
                print(f"{times[-1]:.6f}", flush=True)
times.sort()
print(json.dumps({"diffusers_unet_secs": times[len(times) // 2], "size": args.size, "iters": args.iters,
                  "torch": torch.__version__, "threads": torch.get_num_threads()}))

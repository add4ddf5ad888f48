"""Median wall time of one VAE decode (batch 1, fp32, CPU, 2 threads) in diffusers, the counterpart
of `attend bench vae --random-weights tests/fixtures/manifests/sd15.json` (SD 1.5's AutoencoderKL
with random weights). Usage: bench_diffusers_vae.py SIZE ITERS [--threads N]"""
import argparse, json, time
import torch
from diffusers import AutoencoderKL

parser = argparse.ArgumentParser()
parser.add_argument("size", type=int, help="image size in pixels")
parser.add_argument("iters", type=int, help="timed decodes after one warm-up decode")
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)
config = json.load(open("tests/fixtures/manifests/sd15.json"))["configs"]["vae"]
vae = AutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
factor = 2 ** (len(vae.config.block_out_channels) - 1)
latents = torch.randn(1, vae.config.latent_channels, args.size // factor, args.size // factor)
times = []
with torch.no_grad():
    for i in range(args.iters + 1):
        start = time.perf_counter()
        vae.decode(latents)
        if i > 0:
            times.append(time.perf_counter() - start)
times.sort()
print(json.dumps({"diffusers_vae_decode_secs": times[len(times) // 2], "size": args.size,
                  "iters": args.iters, "torch": torch.__version__, "threads": torch.get_num_threads()}))

"""Weight-space interpolation of two exported attend-shapes folders (WiSE-FT style):
out = (1 - alpha) * base + alpha * tuned, tensor by tensor, for the UNet (fp16 variant) and the text
encoder; every other file is copied from `tuned`. Made attend-shapes v5: it trades the coverage
fine-tune's sharper attention maps against the base model's object accuracy (see README.md, "v5").

    python3 training/blend.py --base assets/attend-shapes --tuned export_v5 --alpha 0.3 --out blend
"""
import argparse
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

WEIGHT_FILES = ["unet/diffusion_pytorch_model.fp16.safetensors", "text_encoder/model.safetensors"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="exported model folder alpha = 0 gives back")
    parser.add_argument("--tuned", required=True, help="exported model folder alpha = 1 gives back")
    parser.add_argument("--alpha", type=float, required=True, help="weight of --tuned, 0..1")
    parser.add_argument("--out", required=True, help="folder to write (replaced if it exists)")
    args = parser.parse_args()
    if not 0.0 <= args.alpha <= 1.0:
        parser.error(f"--alpha {args.alpha} is outside 0..1")
    tmp = args.out.rstrip("/") + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    shutil.copytree(args.tuned, tmp)
    for name in WEIGHT_FILES:
        base = load_file(os.path.join(args.base, name))
        tuned = load_file(os.path.join(args.tuned, name))
        if base.keys() != tuned.keys():
            raise SystemExit(f"{name}: the two folders hold different tensors")
        blended = {}
        for key, tensor in tuned.items():
            if base[key].shape != tensor.shape:
                raise SystemExit(f"{name}: {key} has shape {tuple(base[key].shape)} vs {tuple(tensor.shape)}")
            mixed = (1 - args.alpha) * base[key].float() + args.alpha * tensor.float()
            blended[key] = mixed.to(tensor.dtype).contiguous()
        save_file(blended, os.path.join(tmp, name), metadata={"format": "pt"})
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {1 - args.alpha:g} x {args.base} + {args.alpha:g} x {args.tuned}")


if __name__ == "__main__":
    main()

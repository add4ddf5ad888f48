"""An SD 1.5-size model with random fp16 weights, twice: as a diffusers folder (from the shape
manifest tests/fixtures/manifests/sd15.json) and as one LDM single file made from that folder by
diffusers' own conversion script. For timing `attend bench load` on both (about 2 GB each; delete
them afterwards).

    python scripts/random_sd15_checkpoint.py CONVERT_SCRIPT OUT_DIR

CONVERT_SCRIPT is diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py; OUT_DIR gets
sd15-folder/ and sd15-single.safetensors. Needs torch, safetensors and diffusers.
"""

import json
import os
import shutil
import subprocess
import sys

import torch
from safetensors.torch import save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
}


def main() -> None:
    convert_script, out_dir = sys.argv[1], sys.argv[2]
    manifest = json.load(open(os.path.join(REPO, "tests/fixtures/manifests/sd15.json")))
    folder = os.path.join(out_dir, "sd15-folder")
    shutil.rmtree(folder, ignore_errors=True)
    generator = torch.Generator().manual_seed(0)
    for component, parameters in manifest["parameters"].items():
        os.makedirs(os.path.join(folder, component))
        tensors = {
            name: (torch.randn(shape, generator=generator) * 0.02).half()
            for name, shape in parameters.items()
        }
        save_file(tensors, os.path.join(folder, component, WEIGHT_FILES[component]))
        with open(os.path.join(folder, component, "config.json"), "w") as out:
            json.dump(manifest["configs"][component], out)
    tiny = os.path.join(REPO, "tests/fixtures/tiny-sd1")
    shutil.copytree(os.path.join(tiny, "tokenizer"), os.path.join(folder, "tokenizer"))
    shutil.copytree(os.path.join(tiny, "scheduler"), os.path.join(folder, "scheduler"))
    shutil.copy(os.path.join(tiny, "model_index.json"), folder)
    subprocess.run(
        [sys.executable, convert_script, "--model_path", folder, "--checkpoint_path",
         os.path.join(out_dir, "sd15-single.safetensors"), "--use_safetensors", "--half"],
        check=True, stdout=subprocess.DEVNULL,
    )


if __name__ == "__main__":
    main()

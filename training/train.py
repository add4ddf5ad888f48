"""Train attend's bundled model ("attend-shapes") on scenes from attend's own generator.

The product is Rust; this script is the one-off tool that made the committed weights in
assets/attend-shapes/ (see training/README.md for the exact commands, wall times and results).

Model: a diffusers-layout, pixel-space text-to-image model (no VAE): 64x64 RGB images in [-1, 1],
a CLIP-style text encoder (transformers CLIPTextModel) over a word-level tokenizer, and a diffusers
UNet2DConditionModel with self- and cross-attention at 32x32 and 16x16. Cosine noise schedule,
v-prediction, min-SNR weighting, EMA weights, AdamW with warm-up and cosine decay.

Data: `images.u8` (N x 64 x 64 x 3 uint8) + `captions.txt` (one caption per line) written by attend's
scene generator (src/scenes.rs; `attend scenes --format raw`).

Resumable: `--state DIR` holds `state.pt` (weights, EMA, optimiser, step, RNG), written every
`--checkpoint-minutes` and at the end; a later run with the same `--state` continues.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

SPECIAL = ["<|startoftext|>", "<|endoftext|>", "<unk>"]
# Must match attend's scene vocabulary (src/scenes.rs `vocabulary_words`); a Rust test checks that every
# generator caption word is in the bundled tokenizer.
WORDS = ["a", "an", "and", "on", "background", "with", "the", ",", ".",
         "circle", "square", "triangle", "star",
         "red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
MAX_LENGTH = 77
IMAGE_SIZE = 64


def build_tokenizer():
    vocab = {token: index for index, token in enumerate(SPECIAL + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", vocab["<|startoftext|>"]), ("<|endoftext|>", vocab["<|endoftext|>"])],
    )
    tokenizer.add_special_tokens(SPECIAL)
    return tokenizer, vocab


def configs(vocab):
    text = dict(
        vocab_size=len(vocab), hidden_size=128, intermediate_size=512, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"], projection_dim=128,
    )
    unet = dict(
        sample_size=IMAGE_SIZE, in_channels=3, out_channels=3,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=[64, 128, 128], layers_per_block=2, attention_head_dim=4,
        cross_attention_dim=128, norm_num_groups=32,
    )
    scheduler = {
        "_class_name": "DDIMScheduler", "_diffusers_version": "0.42.1", "num_train_timesteps": 1000,
        "beta_schedule": "squaredcos_cap_v2", "beta_start": 0.0001, "beta_end": 0.02,
        "prediction_type": "v_prediction", "timestep_spacing": "trailing", "steps_offset": 0,
        "clip_sample": False, "set_alpha_to_one": False, "rescale_betas_zero_snr": False,
    }
    return text, unet, scheduler


def cosine_alphas_cumprod(steps=1000, max_beta=0.999):
    # squaredcos_cap_v2, as diffusers builds it from betas.
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)]
    return torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), 0).float()


def encode_captions(tokenizer, captions, pad_id):
    ids = np.full((len(captions), MAX_LENGTH), pad_id, dtype=np.int64)
    for row, encoding in enumerate(tokenizer.encode_batch(captions)):
        tokens = encoding.ids[:MAX_LENGTH]
        ids[row, : len(tokens)] = tokens
    return torch.from_numpy(ids)


SHAPES = {"circle", "square", "triangle", "star"}
COLOURS = {"red", "green", "blue", "yellow", "purple", "orange", "white", "black"}


def object_token_positions(captions, tokenizer, max_objects=3):
    """`[N, max_objects + 1, 2]` token positions (-1: none): for object k, its colour and shape word;
    in the last slot, the background's colour word and the word "background" (when named).

    Object k is the caption's k-th "{colour} {shape}" pair, the same order as objects.u8's ids."""
    positions = np.full((len(captions), max_objects + 1, 2), -1, dtype=np.int64)
    for row, encoding in enumerate(tokenizer.encode_batch(captions)):
        tokens = encoding.tokens
        k = 0
        for index, token in enumerate(tokens):
            if token in SHAPES and index > 0 and tokens[index - 1] in COLOURS and k < max_objects:
                positions[row, k] = (index - 1, index)
                k += 1
            if token == "background" and index > 0 and tokens[index - 1] in COLOURS:
                positions[row, max_objects] = (index - 1, index)
    return torch.from_numpy(positions)


class CrossAttentionRecorder:
    """A diffusers attention processor for the attn2 (cross-attention) modules that computes the softmax
    probabilities explicitly and keeps them (`[batch * heads, queries, tokens]`) for the grounding loss."""

    def __init__(self):
        self.maps = []
        self.enabled = False

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, None)
        if self.enabled:
            self.maps.append((attn.heads, probs))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


def grounding_loss(maps, object_masks, positions, valid, coverage=0.0):
    """TokenCompose-style token loss: for every object's colour and shape token, the share of its
    (spatially normalised) cross-attention that falls outside the object, squared, averaged over layers.

    maps: list of (heads, `[batch * heads, h * w, tokens]`); object_masks: `[batch, 64, 64]` object ids;
    positions: `[batch, objects + 1, 2]` token positions (-1 none; last slot: the background);
    valid: `[batch]` rows with a caption.
    coverage: weight of a coverage term added per word and layer, `1 - soft Dice` between the map
    divided by its maximum and the mask (new in attend-shapes v5): the mass term alone is satisfied
    by maps that sit on the object's interior, which a thresholded map then under-covers; Dice also
    asks that the whole object be lit."""
    total = 0.0
    count = 0
    batch = object_masks.shape[0]
    for heads, probs in maps:
        queries = probs.shape[1]
        side = int(round(math.sqrt(queries)))
        attention = probs.view(batch, heads, queries, -1).mean(1)  # [batch, h*w, tokens]
        for k in range(positions.shape[1]):
            # The last slot is the background (object id 0).
            object_id = 0 if k == positions.shape[1] - 1 else k + 1
            mask = (object_masks == object_id).float()[:, None]
            mask = F.adaptive_avg_pool2d(mask, side).flatten(1)  # [batch, h*w], fraction covered
            present = valid & (positions[:, k, 0] >= 0) & (mask.sum(1) > 0)
            if not present.any():
                continue
            for which in range(2):
                token = positions[:, k, which].clamp(min=0)
                column = attention.gather(2, token[:, None, None].expand(-1, queries, 1)).squeeze(2)
                column = column / (column.sum(1, keepdim=True) + 1e-8)
                inside = (column * mask).sum(1)
                per_row = (1 - inside) ** 2
                if coverage > 0:
                    lit = column / (column.amax(1, keepdim=True) + 1e-8)
                    dice = 2 * (lit * mask).sum(1) / (lit.sum(1) + mask.sum(1) + 1e-8)
                    per_row = per_row + coverage * (1 - dice)
                total = total + (per_row * present.float()).sum()
                count += int(present.sum())
    return total / max(count, 1)


def augment_ids(ids, vocab, generator, drop_prob, device):
    """Caption dropout (-> empty prompt, for guidance), plus occasional unknown words and punctuation
    inserted after the start token or before the end, so that what people type works."""
    batch = ids.shape[0]
    ids = ids.clone()
    empty = torch.full((MAX_LENGTH,), vocab["<|endoftext|>"], dtype=ids.dtype, device=device)
    empty[0] = vocab["<|startoftext|>"]
    drop = torch.rand(batch, generator=generator, device=device) < drop_prob
    ids[drop] = empty
    extras = torch.tensor([vocab["<unk>"], vocab[","], vocab["."], vocab["the"], vocab["with"]], device=device)
    insert = (torch.rand(batch, generator=generator, device=device) < 0.1) & ~drop
    for row in torch.nonzero(insert).flatten().tolist():
        token = extras[torch.randint(len(extras), (1,), generator=generator, device=device)]
        ids[row, 2:] = ids[row, 1:-1].clone()
        ids[row, 1] = token
    return ids, insert.long(), drop


def export_model(folder, text_model, unet, tokenizer, text_config, unet_config, scheduler_config):
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    # The UNet ships as its fp16 variant only (half the size; attend computes in f32).
    import copy
    copy.deepcopy(unet).half().save_pretrained(os.path.join(folder, "unet"), safe_serialization=True, variant="fp16")
    text_model.save_pretrained(os.path.join(folder, "text_encoder"), safe_serialization=True)
    os.makedirs(os.path.join(folder, "tokenizer"))
    tokenizer.save(os.path.join(folder, "tokenizer", "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer", "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                   "unk_token": "<unk>", "model_max_length": MAX_LENGTH, "do_lower_case": True}, f, indent=2)
    os.makedirs(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(scheduler_config, f, indent=2)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
                   "_attend_pixel_space": True,
                   # attend's Prompt-to-Prompt defaults for this model (see the project README):
                   "_attend_edit_defaults": {"self_replace": 0.2, "self_replace_max_side": 32},
                   "scheduler": ["diffusers", "DDIMScheduler"],
                   "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                   "unet": ["diffusers", "UNet2DConditionModel"], "vae": [None, None],
                   "safety_checker": [None, None], "feature_extractor": [None, None]}, f, indent=2)


@torch.no_grad()
def sample_grid(text_model, unet, ids, alphas_cumprod, steps, guidance, seed, device):
    """DDIM (eta 0, trailing spacing) with CFG: a quick look at what the model draws."""
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn((ids.shape[0], 3, IMAGE_SIZE, IMAGE_SIZE), generator=generator, device=device)
    cond = text_model(ids).last_hidden_state
    empty = torch.full_like(ids, ids[0, -1].item())
    empty[:, 0] = ids[0, 0]
    uncond = text_model(empty).last_hidden_state
    timesteps = [int(round(t)) - 1 for t in np.arange(1000, 0, -1000 / steps)]
    for index, t in enumerate(timesteps):
        model_in = torch.cat([x, x])
        v = unet(model_in, t, encoder_hidden_states=torch.cat([uncond, cond])).sample
        v_uncond, v_cond = v.chunk(2)
        v = v_uncond + guidance * (v_cond - v_uncond)
        a_t = alphas_cumprod[t]
        x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * v
        eps = (1 - a_t).sqrt() * x + a_t.sqrt() * v
        a_prev = alphas_cumprod[timesteps[index + 1]] if index + 1 < len(timesteps) else alphas_cumprod.new_tensor(alphas_cumprod[0].item())
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return ((x0.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder with images.u8 and captions.txt")
    parser.add_argument("--state", required=True, help="folder for the resumable state.pt")
    parser.add_argument("--export", required=True, help="diffusers-layout output folder (EMA weights)")
    parser.add_argument("--minutes", type=float, default=8.0, help="stop after this many minutes of training")
    parser.add_argument("--plan-minutes", type=float, default=24.0,
                        help="total training time over all runs; the LR schedule follows trained time")
    parser.add_argument("--init-from", default=None, help="start from an exported model folder's weights")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--ema", type=float, default=0.9995)
    parser.add_argument("--checkpoint-minutes", type=float, default=3.0)
    parser.add_argument("--samples", default=None, help="write a PNG grid of samples here at the end")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke tests)")
    parser.add_argument("--grounding", type=float, default=0.0,
                        help="weight of the cross-attention grounding loss (needs objects.u8); 0: off")
    parser.add_argument("--coverage", type=float, default=0.0,
                        help="weight of the coverage (soft Dice) term inside the grounding loss; 0: off")
    parser.add_argument("--grounding-max-t", type=int, default=800,
                        help="apply the grounding loss only at timesteps below this")
    parser.add_argument("--log-every", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--warmup", type=int, default=500, help="learning-rate warm-up steps")
    parser.add_argument("--multi-object-weight", type=float, default=1.0,
                        help="sample scenes with 2 or more objects this many times as often as 1-object scenes")
    args = parser.parse_args()

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    tokenizer, vocab = build_tokenizer()
    text_config, unet_config, scheduler_config = configs(vocab)
    torch.manual_seed(0)
    text_model = CLIPTextModel(CLIPTextConfig(**text_config)).to(device)
    unet = UNet2DConditionModel(**unet_config).to(device)
    ema_text = CLIPTextModel(CLIPTextConfig(**text_config)).to(device)
    ema_unet = UNet2DConditionModel(**unet_config).to(device)
    ema_text.load_state_dict(text_model.state_dict())
    ema_unet.load_state_dict(unet.state_dict())
    recorder = CrossAttentionRecorder()
    if args.grounding > 0:
        unet.set_attn_processor({name: (recorder if name.endswith("attn2.processor") else processor)
                                 for name, processor in unet.attn_processors.items()})
    parameters = list(text_model.parameters()) + list(unet.parameters())
    ema_parameters = list(ema_text.parameters()) + list(ema_unet.parameters())
    print(f"parameters: unet {sum(p.numel() for p in unet.parameters())/1e6:.2f}M, "
          f"text {sum(p.numel() for p in text_model.parameters())/1e6:.2f}M", flush=True)
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))

    def lr_at(step, trained_secs):
        warmup = args.warmup
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = min(1.0, trained_secs / (args.plan_minutes * 60))
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    step = 0
    trained_before = 0.0
    if args.init_from:
        from safetensors.torch import load_file
        unet_file = os.path.join(args.init_from, "unet", "diffusion_pytorch_model.fp16.safetensors")
        unet.load_state_dict({k: v.float() for k, v in load_file(unet_file).items()})
        text_model.load_state_dict(load_file(os.path.join(args.init_from, "text_encoder", "model.safetensors")), strict=False)
        ema_text.load_state_dict(text_model.state_dict())
        ema_unet.load_state_dict(unet.state_dict())
        print(f"initialised from {args.init_from}", flush=True)
    os.makedirs(args.state, exist_ok=True)
    state_path = os.path.join(args.state, "state.pt")
    if os.path.exists(state_path):
        state = torch.load(state_path, map_location=device)
        text_model.load_state_dict(state["text"])
        unet.load_state_dict(state["unet"])
        ema_text.load_state_dict(state["ema_text"])
        ema_unet.load_state_dict(state["ema_unet"])
        if state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        trained_before = state.get("trained_secs", 0.0)
        print(f"resumed at step {step}", flush=True)

    images = np.fromfile(os.path.join(args.data, "images.u8"), dtype=np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 3)
    with open(os.path.join(args.data, "captions.txt")) as f:
        captions = [line.rstrip("\n") for line in f]
    assert len(captions) == len(images), (len(captions), len(images))
    images = torch.from_numpy(images).to(device)
    caption_ids = encode_captions(tokenizer, captions, vocab["<|endoftext|>"]).to(device)
    if args.grounding > 0:
        objects = np.fromfile(os.path.join(args.data, "objects.u8"), dtype=np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
        assert len(objects) == len(images), (len(objects), len(images))
        objects = torch.from_numpy(objects).to(device)
        positions = object_token_positions(captions, tokenizer).to(device)
    object_counts = torch.tensor([caption.split(" on a")[0].count(" and ") + 1 for caption in captions])
    scene_weights = torch.where(object_counts >= 2, args.multi_object_weight, 1.0).to(device)
    print(f"data: {len(images)} scenes", flush=True)
    alphas_cumprod = cosine_alphas_cumprod().to(device)
    generator = torch.Generator(device=device).manual_seed(1234 + step)

    def save_state():
        tmp = state_path + ".tmp"
        torch.save({"text": text_model.state_dict(), "unet": unet.state_dict(), "ema_text": ema_text.state_dict(),
                    "ema_unet": ema_unet.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "trained_secs": trained_before + time.time() - start}, tmp)
        os.replace(tmp, state_path)

    start = time.time()
    last_checkpoint = start
    losses = []
    ground_losses = []
    text_model.train()
    unet.train()
    while True:
        elapsed = time.time() - start
        if elapsed > args.minutes * 60 or (args.max_steps is not None and step >= args.max_steps):
            break
        index = torch.multinomial(scene_weights, args.batch, replacement=True, generator=generator)
        x0 = images[index].permute(0, 3, 1, 2).float() / 127.5 - 1
        flip = torch.rand(args.batch, generator=generator, device=device) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
        ids, shift, dropped = augment_ids(caption_ids[index], vocab, generator, 0.1, device)
        t = torch.randint(0, 1000, (args.batch,), generator=generator, device=device)
        noise = torch.randn(x0.shape, generator=generator, device=device)
        a = alphas_cumprod[t][:, None, None, None]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        v_target = a.sqrt() * noise - (1 - a).sqrt() * x0
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, trained_before + time.time() - start)
        recorder.maps = []
        recorder.enabled = args.grounding > 0
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            hidden = text_model(ids).last_hidden_state
            v_pred = unet(x_t, t, encoder_hidden_states=hidden).sample
        snr = a.flatten() / (1 - a.flatten())
        weight = torch.clamp(snr, max=5.0) / (snr + 1)
        loss = (weight * ((v_pred.float() - v_target) ** 2).mean(dim=(1, 2, 3))).mean()
        denoise_loss = loss.detach()
        if args.grounding > 0:
            masks = objects[index]
            masks = torch.where(flip[:, None, None], masks.flip(2), masks)
            token_positions = positions[index]
            token_positions = torch.where(token_positions >= 0, token_positions + shift[:, None, None], token_positions)
            valid = ~dropped & (t < args.grounding_max_t)
            ground = grounding_loss([(h, p.float()) for h, p in recorder.maps], masks, token_positions, valid,
                                    coverage=args.coverage)
            recorder.maps = []
            ground_losses.append(float(ground.detach()) if torch.is_tensor(ground) else float(ground))
            loss = loss + args.grounding * ground
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_parameters, parameters, 1 - decay)
        losses.append(denoise_loss.item() if (step % 50 == 0 or device == "cpu") else None)
        if step % args.log_every == 0:
            recent = [l for l in losses[-1000:] if l is not None]
            remaining = args.minutes * 60 - (time.time() - start)
            grounding_text = f" grounding {np.mean(ground_losses[-200:]):.4f}" if ground_losses else ""
            print(f"step {step} loss {np.mean(recent):.4f}{grounding_text} lr {optimizer.param_groups[0]['lr']:.2e} "
                  f"elapsed {time.time() - start:.0f}s left {remaining:.0f}s", flush=True)
        if time.time() - last_checkpoint > args.checkpoint_minutes * 60:
            save_state()
            last_checkpoint = time.time()
    save_state()
    print(f"trained to step {step} in {time.time() - start:.0f}s this run", flush=True)
    ema_text.eval()
    ema_unet.eval()
    export_model(args.export, ema_text, ema_unet, tokenizer, text_config, unet_config, scheduler_config)
    if args.samples:
        from PIL import Image
        prompts = ["a red circle and a blue square", "a green triangle", "a yellow star on a blue background",
                   "an orange square and a purple circle and a black triangle", "a white star on a black background",
                   "a blue circle", "a red triangle and a green star", "a purple square on a yellow background"]
        ids = encode_captions(tokenizer, prompts, vocab["<|endoftext|>"]).to(device)
        rows = [sample_grid(ema_text, ema_unet, ids, alphas_cumprod, 30, 4.0, seed, device) for seed in range(4)]
        grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
        Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(args.samples)
        print("sample prompts (columns):", prompts, flush=True)


if __name__ == "__main__":
    sys.exit(main())

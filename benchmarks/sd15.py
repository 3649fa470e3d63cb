"""A random Stable-Diffusion-1.5-layout diffusers folder, for offline tests and the CPU dry run.

``write_sd15_folder(root)`` writes what ``model.pretrained: root`` reads (docs/gpu.md shows the real
one): ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and
``scheduler/``, each loadable with ``from_pretrained`` and no network. ``full=True`` gives SD-1.5's
exact shapes (UNet 860 M parameters, VAE 84 M, CLIP ViT-L/14 text encoder 123 M; minutes and ~4 GB
on a CPU); the default is tiny-but-same-structure: the same block types, levels, layers per block,
attention and tokenizer layout, with narrow widths (seconds). Random weights: nothing it produces
means anything, it only proves the path loads and runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# the GPT-2 / CLIP byte-to-unicode table: every byte is one printable character
_BYTES = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
_BYTES += list(range(ord("®"), ord("ÿ") + 1))


def _byte_chars() -> list[str]:
    extra = [b for b in range(256) if b not in _BYTES]
    return [chr(c) for c in _BYTES] + [chr(256 + i) for i in range(len(extra))]


def _write_tokenizer(folder: Path) -> int:
    """A byte-level CLIP tokenizer without merges (every byte a token); its vocabulary size."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    words = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {w: i for i, w in enumerate(words)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tok.save_pretrained(folder)
    return len(vocab)


def write_sd15_folder(root: str | Path, *, full: bool = False, seed: int = 0) -> Path:
    """Write the folder (random weights, safetensors); returns ``root``."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = Path(root)
    torch.manual_seed(seed)
    widths = (320, 640, 1280, 1280) if full else (32, 64, 64, 64)
    text_dim = 768 if full else 32
    UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=widths,
        layers_per_block=2,
        norm_num_groups=32,
        cross_attention_dim=text_dim,
        attention_head_dim=8,
    ).save_pretrained(root / "unet")
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512) if full else (32, 32, 64, 64),
        layers_per_block=2,
        norm_num_groups=32,
        latent_channels=4,
        sample_size=512,
        scaling_factor=0.18215,
    ).save_pretrained(root / "vae")
    vocab = _write_tokenizer(root / "tokenizer")
    text = CLIPTextConfig(
        vocab_size=49408 if full else vocab,
        hidden_size=text_dim,
        intermediate_size=3072 if full else 64,
        num_hidden_layers=12 if full else 2,
        num_attention_heads=12 if full else 4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768 if full else 32,
    )
    CLIPTextModel(text).save_pretrained(root / "text_encoder")
    PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True
    ).save_pretrained(root / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root

"""Denoiser eps_theta + Semantic-Guided (SG) network + SFF block, wired as eq. 9 (method.md §3).

The denoiser is diffusers' ``UNet2DConditionModel``; the SG network is ``ControlNetModel.from_unet``
(a copy of the UNet encoder that sees z_t plus an embedding of the hint x0, with zero-initialised
1x1 output convs); SFF fuses the SG residuals of the level above into the lowest-resolution ones.
The small profiles have no attention at all (DownBlock2D/UpBlock2D, ``UNetMidBlock2D`` with one
resnet) and are called with ``encoder_hidden_states=None``, which the installed diffusers (0.42)
accepts for blocks without cross-attention. The paper profile is SD-1.5-shaped with a fixed text
context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel
from torch import Tensor, nn

from dzad.config import ModelConfig
from dzad.errors import DZADError, DZADInputError
from dzad.latents import latent_downsample


@dataclass(frozen=True)
class Profile:
    """UNet shape of a profile; ``cross_attention_dim`` 0 = no attention blocks at all."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    norm_num_groups: int
    sg_embedding_channels: tuple[int, ...]  # ControlNet hint embedding widths, cut to the ratio
    cross_attention_dim: int = 0
    attention_head_dim: int = 8
    freeze_encoder_when_pretrained: bool = False  # paper: UNet encoder + middle block frozen


PROFILES: dict[str, Profile] = {
    # tests: ~0.2 M parameters, milliseconds per forward at 16x16
    "tiny": Profile((16, 32), 1, 8, (8, 16, 32, 64)),
    # 2 CPU cores: 64 px pixel-unshuffle -> 12x32x32 latent; widths measured in the README
    "demo": Profile((32, 64, 64), 1, 16, (16, 32, 64, 128)),
    # real images on CPU: the demo UNet; the rest of the profile is config (PROFILE_SETTINGS)
    "real": Profile((32, 64, 64), 1, 16, (16, 32, 64, 128)),
    # SD-1.5's UNet: 860 M parameters, 4x32x32 VAE latent at 256 px, CLIP-sized context
    "paper": Profile(
        (320, 640, 1280, 1280),
        2,
        32,
        (16, 32, 96, 256),
        768,
        8,
        freeze_encoder_when_pretrained=True,
    ),
}


def resolve_profile(cfg: ModelConfig) -> Profile:
    """The profile with the config's overrides (non-empty / non-zero fields) applied."""
    if cfg.profile not in PROFILES:
        raise ValueError(f"unknown model.profile {cfg.profile!r}; known: {sorted(PROFILES)}")
    p = PROFILES[cfg.profile]
    widths = tuple(cfg.block_out_channels) or p.block_out_channels
    groups = p.norm_num_groups
    while any(w % groups for w in widths):  # overridden widths must stay divisible
        groups //= 2
    return replace(
        p,
        block_out_channels=widths,
        layers_per_block=cfg.layers_per_block or p.layers_per_block,
        norm_num_groups=groups,
        sg_embedding_channels=tuple(cfg.sg_embedding_channels) or p.sg_embedding_channels,
    )


def _unet(p: Profile, channels: int, size: int) -> UNet2DConditionModel:
    levels = len(p.block_out_channels)
    if p.cross_attention_dim:
        down = ("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",)
        up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1)
        mid, cross = "UNetMidBlock2DCrossAttn", p.cross_attention_dim
    else:
        down, up, mid = ("DownBlock2D",) * levels, ("UpBlock2D",) * levels, "UNetMidBlock2D"
        cross = 8  # unused: no block attends; diffusers still wants a number
    return UNet2DConditionModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        down_block_types=down,
        up_block_types=up,
        mid_block_type=mid,
        block_out_channels=p.block_out_channels,
        layers_per_block=p.layers_per_block,
        norm_num_groups=p.norm_num_groups,
        cross_attention_dim=cross,
        attention_head_dim=p.attention_head_dim,
    )


def skip_layout(unet: UNet2DConditionModel) -> list[tuple[int, int]]:
    """``(channels, level)`` of every down skip, in diffusers' order (conv_in first).

    Level 0 is full latent resolution; block i gives ``layers_per_block`` skips at level i and,
    unless it is the last block, its downsampler's output at level i+1.
    """
    widths, layers = unet.config.block_out_channels, unet.config.layers_per_block
    out = [(widths[0], 0)]
    for i, w in enumerate(widths):
        out += [(w, i)] * layers
        if i < len(widths) - 1:
            out.append((w, i + 1))
    return out


class SFF(nn.Module):
    """Semantic Feature Fusion (DiAD): lowest-level skip r_j -> SiLU(r_j + sum_k g_k(r_k)).

    k runs over the skips of the level above; ``g_k = SiLU(Norm(Conv3x3 stride 2 (r_k)))`` with one
    conv per (upper skip, lowest-level channel count). Deviation from DiAD (method.md §3.3): DiAD
    zero-initialises the convs before an InstanceNorm, whose gradient explodes on an all-zero map;
    here the convs keep PyTorch's small random init, have no bias, and the norm (GroupNorm by
    default, ``sff_norm``) starts with a zero scale, so SFF outputs exactly zero until trained and
    the zero-initialised SG network starts as a no-op, like ControlNet's zero convs.
    """

    def __init__(self, layout: list[tuple[int, int]], norm: str) -> None:
        super().__init__()
        lowest = max(level for _, level in layout)
        self.low = [i for i, (_, lv) in enumerate(layout) if lv == lowest]
        self.upper = [i for i, (_, lv) in enumerate(layout) if lv == lowest - 1]
        self.low_channels = {i: layout[i][0] for i in self.low}
        self.fuse = nn.ModuleDict()
        for k in self.upper:
            for c in sorted(set(self.low_channels.values())):
                nrm = (
                    nn.GroupNorm(math.gcd(c, 8), c)
                    if norm == "group"
                    else nn.InstanceNorm2d(c, affine=True)
                )
                nn.init.zeros_(nrm.weight)
                conv = nn.Conv2d(layout[k][0], c, 3, stride=2, padding=1, bias=False)
                self.fuse[f"{k}_{c}"] = nn.Sequential(conv, nrm, nn.SiLU())

    def forward(self, skips: list[Tensor]) -> list[Tensor]:
        """Residual list (diffusers order) -> same list with the lowest-level entries fused."""
        out = list(skips)
        fused: dict[int, Tensor] = {}
        for c in set(self.low_channels.values()):
            fused[c] = sum(self.fuse[f"{k}_{c}"](skips[k]) for k in self.upper)  # type: ignore[assignment]
        for j in self.low:
            out[j] = nn.functional.silu(skips[j] + fused[self.low_channels[j]])
        return out


class DZADNetwork(nn.Module):
    """eps_theta(z_t, t, c) of eq. 9: UNet + SG residuals (+ SFF); ``sg`` None = the "SD" row."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        sg: ControlNetModel | None,
        sff: SFF | None,
        *,
        only_mid_control: bool,
        hint_channels: int,
        image_size: int,
        context: Tensor | None,
        sg_hint: str,
    ) -> None:
        super().__init__()
        self.unet, self.sg, self.sff = unet, sg, sff
        self.only_mid_control = only_mid_control
        self.hint_channels, self.image_size, self.sg_hint = hint_channels, image_size, sg_hint
        self.register_buffer("context", context if context is not None else torch.zeros(0))

    def _context(self, batch: int) -> Tensor | None:
        return self.context.expand(batch, -1, -1) if self.context.numel() else None

    def hint(self, x0: Tensor, z0: Tensor) -> Tensor:
        """The SG hint c of eq. 9 for images x0 ``(B,3,H,W)`` encoded as z0 ``(B,C,h,w)``: x0
        (``model.sg_hint: image``, the paper) or z0 (``latent``)."""
        return z0 if self.sg_hint == "latent" else x0

    def embed_hint(self, hint: Tensor | None, z: Tensor) -> Tensor | None:
        """SG hint embedding ``(B,C_0,h,w)`` of ``hint`` (:meth:`hint`), or of the null hint
        (zeros shaped like it) for the ``B`` latents of ``z`` ``(B,C,h,w)`` when ``hint`` is None.

        It depends on the image only: compute it once per image batch and pass it (rows indexed
        like the latents) as ``hint_embedding`` to every forward on those images. None when the
        network has no SG network (nothing to embed).
        """
        if self.sg is None:
            return None
        if hint is None:  # zeros in place of the image or the latent, as :meth:`hint` picks
            blank = z.new_zeros(z.shape[0], self.hint_channels, self.image_size, self.image_size)
            hint = self.hint(blank, torch.zeros_like(z))
        return self.sg.controlnet_cond_embedding(hint)

    def residuals(
        self, z_t: Tensor, t: Tensor, hint: Tensor | None, *, hint_embedding: Tensor | None = None
    ) -> tuple[list[Tensor], Tensor]:
        """SG residuals fed to the UNet (after SFF and masking): (down skips, middle).

        Down skips in diffusers' order. ``hint`` ``(B,hint_channels,H,W)``; None = the null hint
        (zeros) of the contrast mode. ``hint_embedding`` ``(B,C_0,h,w)``: :meth:`embed_hint` of
        the hint, computed beforehand (``hint`` is then ignored).
        """
        if self.sg is None:
            raise RuntimeError("this network has no SG network (model.use_sg is false)")
        embedded = self.embed_hint(hint, z_t) if hint_embedding is None else hint_embedding
        down, mid = _sg_forward(self.sg, z_t, t, self._context(z_t.shape[0]), embedded)
        if self.sff is not None:
            down = self.sff(down)
        if self.only_mid_control:  # DiAD: control reaches the middle block and the SFF-fused skips
            keep = set(self.sff.low) if self.sff is not None else set()
            down = [r if i in keep else torch.zeros_like(r) for i, r in enumerate(down)]
        return down, mid

    def predict_noise(
        self,
        z_t: Tensor,
        t: Tensor,
        hint: Tensor | None,
        *,
        residuals: tuple[list[Tensor], Tensor] | None = None,
        hint_embedding: Tensor | None = None,
    ) -> Tensor:
        """eq. 9: z_t ``(B,C,h,w)``, t ``(B,)``, hint ``(B,3,H,W)`` or None -> eps ``(B,C,h,w)``.

        ``residuals`` replaces SG(z_t, hint) by given ones (prototype conditions, method.md §7);
        ``hint_embedding`` ``(B,C_0,h,w)`` (:meth:`embed_hint`) replaces the embedding of ``hint``.
        """
        kwargs = {}
        if residuals is None and self.sg is not None:
            residuals = self.residuals(z_t, t, hint, hint_embedding=hint_embedding)
        if residuals is not None:
            kwargs = {
                "down_block_additional_residuals": tuple(residuals[0]),
                "mid_block_additional_residual": residuals[1],
            }
        return self.unet(z_t, t, encoder_hidden_states=self._context(z_t.shape[0]), **kwargs).sample

    def forward(self, z_t: Tensor, t: Tensor, hint: Tensor | None) -> Tensor:
        return self.predict_noise(z_t, t, hint)

    def freeze_unet_encoder(self) -> None:
        """Paper scale: UNet input conv, time embedding, encoder and middle block get no updates."""
        for part in (
            self.unet.conv_in,
            self.unet.time_embedding,
            self.unet.down_blocks,
            self.unet.mid_block,
        ):
            part.requires_grad_(False)


def _attention(block: nn.Module, context: Tensor | None) -> dict[str, Tensor | None]:
    """The context keyword of a diffusers block that cross-attends; none for one that does not."""
    return (
        {"encoder_hidden_states": context} if getattr(block, "has_cross_attention", False) else {}
    )


def _sg_forward(
    sg: ControlNetModel, z_t: Tensor, t: Tensor, context: Tensor | None, hint_embedding: Tensor
) -> tuple[list[Tensor], Tensor]:
    """``ControlNetModel.forward`` after its hint embedding, for the SG networks built here.

    z_t ``(B,C,h,w)``, t ``(B,)``, ``hint_embedding`` ``(B,C_0,h,w)`` -> zero-conv residuals: down
    skips (diffusers' order) and middle. The same operations in the same order as diffusers with
    RGB hints, no class / added embeddings, conditioning scale 1 and no guess mode (what
    :func:`build_network` makes), so the result is identical to ``sg(z_t, t, ..., hint)``.
    """
    emb = sg.time_embedding(sg.time_proj(t.expand(z_t.shape[0])).to(dtype=z_t.dtype))
    sample = sg.conv_in(z_t) + hint_embedding
    skips = [sample]
    for block in sg.down_blocks:
        sample, res = block(hidden_states=sample, temb=emb, **_attention(block, context))
        skips.extend(res)
    sample = sg.mid_block(sample, emb, **_attention(sg.mid_block, context))
    down = [zero_conv(r) for zero_conv, r in zip(sg.controlnet_down_blocks, skips, strict=True)]
    return down, sg.controlnet_mid_block(sample)


def sg_embedding_channels(p: Profile, hint_size: int, latent_size: int) -> tuple[int, ...]:
    """Widths of the hint embedding: one stride-2 conv per factor 2 from ``hint_size`` to latent."""
    ratio = hint_size // latent_size
    if hint_size % latent_size or ratio & (ratio - 1):
        raise ValueError(f"hint size {hint_size} / latent size {latent_size} is not a power of two")
    n = int(math.log2(ratio)) + 1
    base = p.sg_embedding_channels
    if n > len(base):  # keep doubling past the profile's list
        base = base + tuple(base[-1] * 2 ** (i + 1) for i in range(n - len(base)))
    return base[:n]


def _context(cfg: ModelConfig, p: Profile, width: int) -> Tensor | None:
    """Fixed text context ``(1,L,width)`` (``width``: the UNet's cross-attention size) of the
    cross-attention profile: zeros, or SD's empty-prompt embedding from ``pretrained``'s
    ``tokenizer/`` and ``text_encoder/`` (a local folder: docs/gpu.md)."""
    if not p.cross_attention_dim:
        return None
    if cfg.context == "zeros" or cfg.pretrained is None:
        return torch.zeros(1, 1, width)
    try:
        from transformers import CLIPTextModel, CLIPTokenizer  # optional dependency
    except ImportError as exc:
        raise DZADError(
            "model.context 'empty_prompt' needs the `transformers` package (text encoder): "
            "pip install -e '.[paper]', or set model.context: zeros"
        ) from exc
    try:
        tok = CLIPTokenizer.from_pretrained(cfg.pretrained, subfolder="tokenizer")
        enc = CLIPTextModel.from_pretrained(cfg.pretrained, subfolder="text_encoder")
    except (OSError, ValueError) as exc:
        raise DZADInputError(
            cfg.pretrained, f"cannot load the empty-prompt text encoder / tokenizer: {exc}"
        ) from exc
    ids = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt")
    with torch.no_grad():
        return enc(ids.input_ids).last_hidden_state.float()


def _load_unet(source: str) -> UNet2DConditionModel:
    try:
        return UNet2DConditionModel.from_pretrained(source, subfolder="unet", use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise DZADInputError(
            source, f"cannot load a diffusers UNet from its 'unet' folder: {exc}"
        ) from exc


def build_network(
    cfg: ModelConfig, latent_channels: int, latent_size: int, *, image_size: int | None = None
) -> DZADNetwork:
    """UNet (pretrained when ``cfg.pretrained``) + SG copied from it + SFF; freezing per profile.

    ``image_size`` (hint resolution) defaults to ``latent_size`` x the latent's downsampling factor.
    """
    p = resolve_profile(cfg)
    image_size = image_size or latent_size * latent_downsample(cfg)
    if cfg.pretrained is not None:
        unet = _load_unet(cfg.pretrained)
        if unet.config.in_channels != latent_channels:
            raise DZADInputError(
                cfg.pretrained,
                f"UNet takes {unet.config.in_channels} channels, the latent has {latent_channels}",
            )
    else:
        unet = _unet(p, latent_channels, latent_size)
    sg = None
    if cfg.use_sg:  # a latent hint is already on the latent grid: no downsampling
        hint_channels, hint_size = (
            (latent_channels, latent_size)
            if cfg.sg_hint == "latent"
            else (cfg.hint_channels, image_size)
        )
        sg = ControlNetModel.from_unet(
            unet,
            conditioning_channels=hint_channels,
            conditioning_embedding_out_channels=sg_embedding_channels(p, hint_size, latent_size),
        )
    context = _context(cfg, p, int(unet.config.cross_attention_dim))
    return assemble_network(cfg, unet, sg, image_size=image_size, context=context)


def assemble_network(
    cfg: ModelConfig,
    unet: UNet2DConditionModel,
    sg: ControlNetModel | None,
    *,
    image_size: int,
    context: Tensor | None,
) -> DZADNetwork:
    """:class:`DZADNetwork` of ``unet`` and ``sg`` (+ SFF when SG is on and the UNet has more
    than one level), frozen per :func:`freezes_unet_encoder`; shared by :func:`build_network` and
    the checkpoint loader (which then loads the SFF weights)."""
    sff = None
    if sg is not None and len(unet.config.block_out_channels) > 1:
        sff = SFF(skip_layout(unet), cfg.sff_norm)
    net = DZADNetwork(
        unet,
        sg,
        sff,
        only_mid_control=cfg.only_mid_control,
        hint_channels=cfg.hint_channels,
        image_size=image_size,
        context=context,
        sg_hint=cfg.sg_hint,
    )
    if freezes_unet_encoder(cfg):
        net.freeze_unet_encoder()
    return net


def freezes_unet_encoder(cfg: ModelConfig) -> bool:
    """Frozen when asked, or by the paper profile whenever pretrained weights are loaded."""
    p = resolve_profile(cfg)
    return cfg.freeze_unet_encoder or (p.freeze_encoder_when_pretrained and bool(cfg.pretrained))


def make_scheduler(cfg: ModelConfig) -> DDPMScheduler:
    """Training noise schedule (eq. 7 with alpha-bar, docs/method.md §4)."""
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type="epsilon",
        clip_sample=False,
    )


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def forward_flops(net: DZADNetwork, latent_channels: int, latent_size: int) -> tuple[int, int]:
    """FLOPs on one image (torch's FlopCounterMode; 2 per multiply-add) of ``(one predict_noise
    reusing a precomputed SG hint embedding, one hint embedding)``: scoring embeds each image's
    hint once and reuses it in every forward (:meth:`DZADNetwork.embed_hint`)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(net.parameters()).device
    z = torch.zeros(1, latent_channels, latent_size, latent_size, device=device)
    embed, forward = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with torch.no_grad():
        with embed:
            embedded = net.embed_hint(None, z)  # the null hint: a real hint's shape and cost
        with forward:
            net.predict_noise(z, torch.tensor([500], device=device), None, hint_embedding=embedded)
    return int(forward.get_total_flops()), int(embed.get_total_flops())


def flops_per_forward(net: DZADNetwork, latent_channels: int, latent_size: int) -> int:
    """FLOPs of one ``predict_noise`` on one image, its SG hint embedding included."""
    return sum(forward_flops(net, latent_channels, latent_size))


def model_stats(net: DZADNetwork, latent_channels: int, latent_size: int) -> dict[str, int]:
    """Parameters (all / trainable / per part) and FLOPs per forward (README's profile table)."""
    return {
        "params": count_parameters(net),
        "trainable": count_parameters(net, trainable_only=True),
        "unet": count_parameters(net.unet),
        "sg": count_parameters(net.sg) if net.sg is not None else 0,
        "sff": count_parameters(net.sff) if net.sff is not None else 0,
        "flops_per_forward": flops_per_forward(net, latent_channels, latent_size),
    }

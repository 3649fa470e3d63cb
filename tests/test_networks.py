"""eq. 9 wiring of the denoiser, the SG network and SFF on the tiny profile."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

from dzad.config import ModelConfig, NoiseConfig, ReconstructionConfig
from dzad.errors import DZADError
from dzad.networks import (
    PROFILES,
    build_network,
    count_parameters,
    flops_per_forward,
    make_scheduler,
    model_stats,
    sg_embedding_channels,
    skip_layout,
)
from dzad.noise_features import NoiseBank, noise_features, sg_residual_means
from dzad.reconstruction import image_seeds, reconstruct

CFG = ModelConfig(profile="tiny", latent="pixel")


def _net(cfg: ModelConfig = CFG, channels: int = 3, size: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    return build_network(cfg, channels, size).eval()


def _inputs(channels: int = 3, size: int = 16, image: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, channels, size, size, generator=g)
    hint = torch.rand(2, 3, image, image, generator=g)
    return z, torch.tensor([10, 700]), hint


def _perturb(module: torch.nn.Module, seed: int = 3, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def test_output_shapes_pixel_and_unshuffle():
    z, t, hint = _inputs()
    assert _net().predict_noise(z, t, hint).shape == (2, 3, 16, 16)
    cfg = dataclasses.replace(CFG, latent="pixel_unshuffle")
    net = _net(cfg, channels=12, size=8)
    assert net.image_size == 16  # 8 x the unshuffle factor 2
    z, t, hint = _inputs(channels=12, size=8, image=16)
    assert net.predict_noise(z, t, hint).shape == (2, 12, 8, 8)
    assert net.predict_noise(z, t, None).shape == (2, 12, 8, 8)  # null hint


def test_zero_initialised_sg_leaves_unet_output_unchanged():
    net = _net()
    sd = _net(dataclasses.replace(CFG, use_sg=False))
    assert sd.sg is None and sd.sff is None
    sd.unet.load_state_dict(net.unet.state_dict())
    z, t, hint = _inputs()
    with torch.no_grad():
        assert torch.equal(net.predict_noise(z, t, hint), sd.predict_noise(z, t, hint))
        _perturb(net.sg)
        _perturb(net.sff)
        moved = net.predict_noise(z, t, hint)
        assert not torch.allclose(moved, sd.predict_noise(z, t, hint), atol=1e-4)
        # the hint is not ignored: another hint gives another prediction
        assert not torch.allclose(moved, net.predict_noise(z, t, hint.flip(0)), atol=1e-4)


def test_only_mid_control_zeroes_all_but_sff_fused_lowest_skips():
    net = _net()
    _perturb(net.sg)
    _perturb(net.sff)
    low = set(net.sff.low)
    layout = skip_layout(net.unet)
    lowest = max(level for _, level in layout)
    assert low == {i for i, (_, lv) in enumerate(layout) if lv == lowest}
    z, t, hint = _inputs()
    with torch.no_grad():
        down, mid = net.residuals(z, t, hint)
    assert len(down) == len(layout)
    for i, r in enumerate(down):
        assert r.shape[1] == layout[i][0]
        if i in low:
            assert r.abs().max() > 0
        else:
            assert torch.count_nonzero(r) == 0
    assert mid.abs().max() > 0


def test_sff_changes_only_the_lowest_skips_and_matches_its_formula():
    net = _net(dataclasses.replace(CFG, only_mid_control=False))
    _perturb(net.sg)
    _perturb(net.sff)
    z, t, hint = _inputs()
    with torch.no_grad():
        raw, raw_mid = net.sg(
            z, t, encoder_hidden_states=None, controlnet_cond=hint, return_dict=False
        )
        down, mid = net.residuals(z, t, hint)
        assert torch.equal(mid, raw_mid)
        for i, (r, r0) in enumerate(zip(down, raw, strict=True)):
            if i not in net.sff.low:
                assert torch.equal(r, r0)
                continue
            c = r0.shape[1]
            fused = sum(net.sff.fuse[f"{k}_{c}"](raw[k]) for k in net.sff.upper)
            assert torch.allclose(r, torch.nn.functional.silu(r0 + fused), atol=1e-6)
            assert not torch.allclose(r, r0, atol=1e-4)


def test_fresh_sff_outputs_zero_fusion():
    net = _net()
    _perturb(net.sg)
    z, t, hint = _inputs()
    with torch.no_grad():
        raw, _ = net.sg(z, t, encoder_hidden_states=None, controlnet_cond=hint, return_dict=False)
        down, _ = net.residuals(z, t, hint)
    for j in net.sff.low:  # zero-scale norm: SiLU(skip + 0)
        assert torch.allclose(down[j], torch.nn.functional.silu(raw[j]), atol=1e-7)


def test_sg_embedding_downsamples_hint_to_latent():
    p = PROFILES["demo"]
    assert sg_embedding_channels(p, 64, 64) == (16,)
    assert sg_embedding_channels(p, 64, 32) == (16, 32)
    assert len(sg_embedding_channels(p, 256, 32)) == 4
    assert len(sg_embedding_channels(p, 256, 8)) == 6  # widths keep doubling past the profile
    with pytest.raises(ValueError, match="power of two"):
        sg_embedding_channels(p, 48, 16)


def test_latent_sg_hint_embeds_z0_without_downsampling():
    cfg = dataclasses.replace(CFG, latent="pixel_unshuffle", sg_hint="latent")
    net = _net(cfg, channels=12, size=8)
    assert net.sg.config.conditioning_channels == 12  # the latent's channels, not RGB
    z, t, image = _inputs(channels=12, size=8, image=16)
    assert net.hint(image, z) is z and _net().hint(image, z) is image
    embedded = net.embed_hint(z, z)
    assert embedded.shape[-2:] == z.shape[-2:]  # already on the latent grid
    assert torch.equal(net.embed_hint(None, z), net.embed_hint(torch.zeros_like(z), z))
    _perturb(net.sg)  # a trained SG: the latent hint now moves the prediction
    eps = net.predict_noise(z, t, z)
    assert not torch.allclose(eps, net.predict_noise(z, t, None))
    assert not torch.allclose(eps, net.predict_noise(z, t, z.roll(1, dims=0)))
    with pytest.raises(RuntimeError):  # an image is not a latent hint
        net.predict_noise(z, t, image)


def test_scheduler_is_scaled_linear_with_alpha_bar():
    cfg = ModelConfig(num_train_timesteps=100)
    s = make_scheduler(cfg)
    betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, 100, dtype=torch.float32) ** 2
    assert torch.allclose(s.alphas_cumprod, torch.cumprod(1 - betas, 0), atol=1e-6)


def _paper_tiny(**kw) -> ModelConfig:
    return ModelConfig(profile="paper", latent="vae", block_out_channels=(8, 8), **kw)


def test_paper_profile_has_cross_attention_with_fixed_context():
    net = _net(_paper_tiny(), channels=4, size=4)
    assert net.unet.config.cross_attention_dim == 768
    assert any("CrossAttn" in b for b in net.unet.config.down_block_types)
    assert net.context.shape == (1, 1, 768) and torch.count_nonzero(net.context) == 0
    assert net.image_size == 32  # SD-shaped VAE downsamples by 8
    z, t, hint = _inputs(channels=4, size=4, image=32)
    assert net.predict_noise(z, t, hint).shape == (2, 4, 4, 4)


def test_pretrained_unet_is_loaded_and_its_encoder_frozen(tmp_path):
    src = _net(_paper_tiny(), channels=4, size=4, seed=5)
    _perturb(src.unet, seed=6, scale=0.05)
    src.unet.save_pretrained(tmp_path / "unet")
    net = _net(_paper_tiny(pretrained=str(tmp_path)), channels=4, size=4, seed=0)
    for (k, a), b in zip(
        src.unet.state_dict().items(), net.unet.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), k
    frozen = (net.unet.conv_in, net.unet.time_embedding, net.unet.down_blocks, net.unet.mid_block)
    assert not any(p.requires_grad for part in frozen for p in part.parameters())
    assert all(p.requires_grad for p in net.unet.up_blocks.parameters())
    assert all(p.requires_grad for p in net.sg.parameters())
    with pytest.raises(DZADError, match="cannot load"):
        _net(_paper_tiny(pretrained=str(tmp_path / "missing")), channels=4, size=4)


def test_empty_prompt_context_needs_transformers(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    src = _net(_paper_tiny(), channels=4, size=4)
    src.unet.save_pretrained(tmp_path / "unet")
    with pytest.raises(DZADError, match=r"transformers.*\[paper\]"):
        _net(_paper_tiny(pretrained=str(tmp_path), context="empty_prompt"), channels=4, size=4)


def test_parameter_and_flop_counts():
    net = _net()
    stats = model_stats(net, 3, 16)
    assert stats["params"] == stats["unet"] + stats["sg"] + stats["sff"]
    assert stats["params"] == count_parameters(net) > count_parameters(net.unet) > 0
    sd = _net(dataclasses.replace(CFG, use_sg=False))
    assert 0 < flops_per_forward(sd, 3, 16) < stats["flops_per_forward"]
    # a conv-only UNet's FLOPs grow ~4x when the latent side doubles
    ratio = flops_per_forward(sd, 3, 32) / flops_per_forward(sd, 3, 16)
    assert 3.5 < ratio < 4.5


# ----------------------------------------------------------------- hint embedding computed once
class PerCallHint(torch.nn.Module):
    """The per-call path: the raw hint rows reach every forward, which embeds them again."""

    def __init__(self, net) -> None:
        super().__init__()
        self.net = net

    def embed_hint(self, hint, z):
        return hint

    def predict_noise(self, z_t, t, hint, *, residuals=None, hint_embedding=None):
        return self.net.predict_noise(z_t, t, hint_embedding, residuals=residuals)

    def residuals(self, z_t, t, hint, *, hint_embedding=None):
        return self.net.residuals(z_t, t, hint_embedding)


def _trained_unshuffle_net():
    """Tiny profile on a 12x8x8 pixel-unshuffle latent of 16 px images, SG and SFF non-zero."""
    net = _net(dataclasses.replace(CFG, latent="pixel_unshuffle"), channels=12, size=8)
    _perturb(net.sg)
    _perturb(net.sff)
    return net


@pytest.mark.parametrize("cfg", [CFG, _paper_tiny()], ids=["tiny", "cross_attention"])
def test_sg_residuals_equal_diffusers_controlnet_forward(cfg):
    channels, size, image = (3, 16, 16) if cfg is CFG else (4, 4, 32)
    net = _net(dataclasses.replace(cfg, only_mid_control=False), channels, size)
    net.sff = None  # the raw SG residuals
    _perturb(net.sg)
    z, t, hint = _inputs(channels, size, image)
    with torch.no_grad():
        for h in (hint, None):
            cond = torch.zeros_like(hint) if h is None else h
            want_down, want_mid = net.sg(
                z, t, encoder_hidden_states=net._context(2), controlnet_cond=cond, return_dict=False
            )
            down, mid = net.residuals(z, t, h)
            assert torch.equal(mid, want_mid) and all(map(torch.equal, down, want_down))
            embedded = net.embed_hint(h, z)
            assert embedded.shape == (2, net.sg.conv_in.out_channels, size, size)
            once = net.predict_noise(z, t, None, hint_embedding=embedded)
            assert torch.equal(once, net.predict_noise(z, t, h))


def test_noise_features_embed_the_hint_once_with_the_same_result():
    net = _trained_unshuffle_net()
    alphas = make_scheduler(CFG).alphas_cumprod
    bank = NoiseBank.create(NoiseConfig(n_stages=4, m_samples=2, seed=7), 1000, (12, 8, 8))
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 3, 16, 16, generator=g)
    z0 = torch.nn.functional.pixel_unshuffle(2 * x - 1, 2)
    embeds = []
    handle = net.sg.controlnet_cond_embedding.register_forward_hook(
        lambda m, i, o: embeds.append(i[0].shape[0])
    )
    try:
        for hint in (x, None):  # the SG hint and the contrast mode's null hint
            embeds.clear()
            # max_batch 5: chunks hold several images, each repeated across bank entries
            once = noise_features(net, z0, hint, bank, alphas, 5)
            assert embeds == [3]  # one embedding of the 3 images, not one per forward
            per_call = noise_features(PerCallHint(net), z0, hint, bank, alphas, 5)
            assert torch.allclose(once.F, per_call.F, rtol=0, atol=1e-6)
            assert torch.allclose(once.spatial, per_call.spatial, rtol=0, atol=1e-6)
        once_means = sg_residual_means(net, z0, x, bank, alphas, 5)
        per_call_means = sg_residual_means(PerCallHint(net), z0, x, bank, alphas, 5)
    finally:
        handle.remove()
    (once_down, once_mid), (per_call_down, per_call_mid) = once_means, per_call_means
    for a, b in zip([*once_down, once_mid], [*per_call_down, per_call_mid], strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)


def test_reconstruction_embeds_the_hint_once_with_the_same_result():
    net = _trained_unshuffle_net()
    alphas = make_scheduler(CFG).alphas_cumprod
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    z0 = torch.nn.functional.pixel_unshuffle(2 * x - 1, 2)
    cfg = ReconstructionConfig(steps=5)
    kwargs = {"clamp_range": (-1.0, 1.0), "alphas_cumprod": alphas, "seeds": image_seeds(x, 0)}
    with torch.no_grad():
        for hint in (x, None):
            once = reconstruct(net, z0, hint, cfg, 1000, **kwargs)
            per_call = reconstruct(PerCallHint(net), z0, hint, cfg, 1000, **kwargs)
            assert torch.allclose(once, per_call, rtol=0, atol=1e-6)

"""The model is general, not fitted to the fixture: other head dims, head counts, depths,
grids and batches, against tests/official_math.py (itself checked against the golden data),
and the KV-cache path against the equivalent single forward."""

import json

import pytest
import torch
from helpers import MODEL_RTOL, assert_close_rel
from official_math import official_forward, random_official_state_dict
from safetensors.torch import save_file

import longcat_native as lcn


def _write_checkpoint(tmp_path, cfg, seed=0):
    d = tmp_path / "dit"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    sd = random_official_state_dict(cfg, seed)
    save_file(sd, str(d / "diffusion_pytorch_model.safetensors"))
    return tmp_path, sd


def _cfg(hidden, heads, depth, caption=24, tembed=16, zero_pad=True):
    return dict(in_channels=16, out_channels=16, hidden_size=hidden, depth=depth, num_heads=heads,
                caption_channels=caption, adaln_tembed_dim=tembed, mlp_ratio=4, patch_size=[1, 2, 2],
                text_tokens_zero_pad=zero_pad)


def _inputs(B, T, H, W, L, caption, seed=0, per_frame=False, mask=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 16, T, H, W, generator=g)
    t = torch.rand(B, T, generator=g) * 1000 if per_frame else torch.rand(B, generator=g) * 1000
    text = torch.randn(B, 1, L, caption, generator=g)
    m = None
    if mask:
        m = torch.ones(B, L, dtype=torch.long)
        for b in range(B):
            m[b, 1 + (b * 3) % L:] = 0  # every item keeps at least one token
    return x, t, text, m


# (hidden, heads) pairs give head dims 8, 24, 40, 64 and 48 (RoPE splits 4/2/2 ... 16/16/16).
SHAPES = [
    dict(hidden=16, heads=2, depth=1, grid=(1, 2, 2), B=1),
    dict(hidden=72, heads=3, depth=2, grid=(2, 4, 6), B=2),
    dict(hidden=120, heads=3, depth=3, grid=(3, 2, 10), B=1),
    dict(hidden=128, heads=2, depth=1, grid=(2, 6, 4), B=3),
    dict(hidden=96, heads=2, depth=2, grid=(4, 4, 4), B=2),
]


@pytest.mark.parametrize("zero_pad", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"C{s['hidden']}h{s['heads']}d{s['depth']}g{s['grid']}B{s['B']}")
def test_forward_matches_official_math(tmp_path, shape, zero_pad):
    cfg = _cfg(shape["hidden"], shape["heads"], shape["depth"], zero_pad=zero_pad)
    root, sd = _write_checkpoint(tmp_path, cfg, seed=shape["hidden"])
    dit = lcn.LongCatDiT.from_pretrained(root, kernels="reference", device="cpu", dtype=torch.float32)
    T, H, W = shape["grid"]
    x, t, text, mask = _inputs(shape["B"], T, H, W, L=5, caption=24, seed=1, per_frame=T > 1)
    for nc in sorted({0, T - 1}):
        out = dit(x, t, text, mask, num_cond_latents=nc)
        ref = official_forward(sd, cfg, x, t, text, mask, num_cond_latents=nc)
        assert_close_rel(out, ref, MODEL_RTOL, f"{shape} num_cond_latents={nc}")


def test_kv_cache_continuation_equals_single_forward(tmp_path):
    """Prefill on m clean frames then continue on T noisy frames == one forward over m + T
    frames with num_cond_latents=m (conditioning frames at timestep 0), on the noisy frames."""
    cfg = _cfg(72, 3, 2)
    root, _ = _write_checkpoint(tmp_path, cfg, seed=3)
    dit = lcn.LongCatDiT.from_pretrained(root, kernels="reference", attention="reference")
    m, T, H, W, B = 2, 3, 4, 6, 2
    x, _, text, mask = _inputs(B, m + T, H, W, L=5, caption=24, seed=4)
    t_noisy = torch.rand(B, T) * 1000
    t_full = torch.cat([torch.zeros(B, m), t_noisy], dim=1)
    full = dit(x, t_full, text, mask, num_cond_latents=m)

    _, cache_b1 = dit(x[:1, :, :m], torch.zeros(1), text[:1], None, return_kv=True, skip_crs_attn=True)
    # A batch-1 cache from item 0's conditioning serves a batch whose items share it.
    x_shared = x.clone()
    x_shared[:, :, :m] = x[:1, :, :m]
    full_shared = dit(x_shared, t_full, text, mask, num_cond_latents=m)
    for nc_arg in (m, 0):  # 0: inferred from the cache
        cont = dit(x_shared[:, :, m:], t_noisy, text, mask, num_cond_latents=nc_arg, kv_cache_dict=cache_b1)
        assert_close_rel(cont, full_shared[:, :, m:], MODEL_RTOL, f"continuation nc={nc_arg}")
    # A batch-B cache with a different conditioning per item.
    _, cache_b = dit(x[:, :, :m], torch.zeros(B), text, None, return_kv=True, skip_crs_attn=True)
    cont = dit(x[:, :, m:], t_noisy, text, mask, num_cond_latents=m, kv_cache_dict=cache_b)
    assert_close_rel(cont, full[:, :, m:], MODEL_RTOL, "continuation batch-B cache")


def test_offload_kv_cache_returns_host_tensors(tmp_path):
    dit = lcn.LongCatDiT.from_config("tiny")
    x, t, text, _ = _inputs(1, 2, 4, 4, L=3, caption=64, mask=False)
    out, kv = dit(x, t, text, return_kv=True, offload_kv_cache=True)
    assert set(kv) == {0, 1}
    for k, v in kv.values():
        assert k.device.type == "cpu" and k.shape == (1, 4, 8, 32) and k.is_contiguous()
        assert v.shape == k.shape
    # The host-side cache feeds a continuation directly (moved to the model's device per block).
    cont = dit(torch.randn(1, 16, 1, 4, 4), t, text, kv_cache_dict=kv, offload_kv_cache=True)
    assert cont.shape == (1, 16, 1, 4, 4) and torch.isfinite(cont).all()


def test_dtype_bf16_runs_and_is_close(tmp_path):
    cfg = _cfg(72, 3, 2)
    root, sd = _write_checkpoint(tmp_path, cfg, seed=5)
    x, t, text, mask = _inputs(2, 2, 4, 6, L=5, caption=24, seed=6)
    # The official model rounds the timestep to its dtype before embedding it (bf16 steps are 4
    # apart near t = 1000), so the oracle gets the rounded timestep.
    ref = official_forward(sd, cfg, x, t.to(torch.bfloat16), text, mask)
    dit = lcn.LongCatDiT.from_pretrained(root, dtype=torch.bfloat16, kernels="reference")
    assert dit.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in dit.parameters())
    out = dit(x, t, text, mask)
    assert out.dtype == torch.float32
    # bf16 weights and activations through 2 blocks: a few percent of the output scale.
    assert_close_rel(out, ref, 5e-2, "bf16 vs float64 oracle")

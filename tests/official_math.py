"""A second, independent transcription of the official forward (docs/model.md), for tests.

It reads the OFFICIAL parameter names and layouts (Conv3d patch embed, separate ffn.w1/w3,
``adaLN_modulation.1``) straight from a state dict and does everything the slow, obvious way:
float64 throughout, RoPE by explicit angle tables, attention token by token per batch item.
It is checked against the golden fixtures (tests/test_official_math.py), and then serves as
the oracle for configurations the fixtures do not cover (other head dims, heads, depths, grids,
batch sizes). It shares no code with longcat_native on purpose.
"""

import math

import torch
import torch.nn.functional as F

DT = torch.float64


def _lin(x, sd, name, bias=True):
    w = sd[name + ".weight"].to(DT)
    b = sd[name + ".bias"].to(DT) if bias and (name + ".bias") in sd else None
    return F.linear(x, w, b)


def _layernorm(x, w=None, b=None, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps)
    if w is not None:
        y = y * w.to(DT) + b.to(DT)
    return y


def _rmsnorm(x, w, eps=1e-6):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w.to(DT)


def _rope_angles(D, T, H, W, t0=0):
    """[N, D/2] angles: one per channel pair, slices [t | h | w] of widths Dt, Dh, Dw."""
    dh = 2 * (D // 6)
    dt = D - 2 * dh
    rows = []
    for t in range(t0, t0 + T):
        for h in range(H):
            for w in range(W):
                ang = []
                for pos, width in ((t, dt), (h, dh), (w, dh)):
                    for i in range(width // 2):
                        ang.append(pos * 10000.0 ** (-2.0 * i / width))
                rows.append(ang)
    return torch.tensor(rows, dtype=DT)


def _rope(x, ang):
    """x [B, N, heads, D]; pairs (2i, 2i+1) rotate by ang[:, i]."""
    c, s = torch.cos(ang)[None, :, None, :], torch.sin(ang)[None, :, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x1 * c + x0 * s
    return out


def _attend(q, k, v, valid=None):
    """q [Nq, heads, D], k/v [Nk, heads, D] -> [Nq, heads, D]."""
    if valid is not None:
        k, v = k[valid], v[valid]
    if k.shape[0] == 0 or q.shape[0] == 0:
        return torch.zeros_like(q)
    s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v)


def official_forward(sd, cfg, hidden_states, timestep, text, text_mask=None, num_cond_latents=0,
                     skip_crs_attn=False, kv_cache=None, return_kv=False):
    """cfg: dict of official config keys. kv_cache: {block: (k, v)} [Bc, heads, Nc, D].
    Returns float64 output [B, C_out, T, H, W] (and {block: (k, v)} [B, heads, N, D] with return_kv)."""
    C, heads = cfg["hidden_size"], cfg["num_heads"]
    D = C // heads
    depth = cfg["depth"]
    B, Cin, T, H, W = hidden_states.shape
    Hp, Wp = H // 2, W // 2
    N, tpf = T * Hp * Wp, Hp * Wp

    x = F.conv3d(hidden_states.to(DT), sd["x_embedder.proj.weight"].to(DT), sd["x_embedder.proj.bias"].to(DT),
                 stride=(1, 2, 2))
    x = x.flatten(2).transpose(1, 2)  # [B, N, C]

    if timestep.dim() == 1:
        timestep = timestep[:, None].expand(B, T)
    half = cfg.get("frequency_embedding_size", 256) // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=DT) / half)
    args = timestep.reshape(-1).to(DT)[:, None] * freqs[None]
    feats = torch.cat([torch.cos(args), torch.sin(args)], -1)
    temb = _lin(F.silu(_lin(feats, sd, "t_embedder.mlp.0")), sd, "t_embedder.mlp.2").view(B, T, -1)

    y = None
    valid = None
    if not skip_crs_attn:
        if text.dim() == 4:
            text = text[:, 0]
        y = _lin(F.gelu(_lin(text.to(DT), sd, "y_embedder.y_proj.0"), approximate="tanh"), sd, "y_embedder.y_proj.2")
        if text_mask is not None:
            if cfg.get("text_tokens_zero_pad", False):
                y = y * (text_mask != 0).to(DT)[..., None]
            else:
                valid = text_mask != 0

    m = 0
    if kv_cache:
        m = kv_cache[0][0].shape[2] // tpf
    ang_q = _rope_angles(D, T, Hp, Wp, t0=m)
    ang_c = _rope_angles(D, m, Hp, Wp) if m else None
    nc = 0 if kv_cache else num_cond_latents * tpf

    def per_frame(v):  # [B, T, C] -> [B, N, C]
        return v.repeat_interleave(tpf, dim=1)

    kv_out = {}
    for i in range(depth):
        p = f"blocks.{i}."
        mod = _lin(F.silu(temb), sd, p + "adaLN_modulation.1").chunk(6, -1)
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = (per_frame(v) for v in mod)

        h = _layernorm(x) * (1 + sc_a) + sh_a
        q, k, v = _lin(h, sd, p + "attn.qkv").view(B, N, 3, heads, D).unbind(2)
        q = _rmsnorm(q, sd[p + "attn.q_norm.weight"])
        k = _rmsnorm(k, sd[p + "attn.k_norm.weight"])
        if return_kv:
            kv_out[i] = (k.transpose(1, 2).clone(), v.transpose(1, 2).clone())
        q, kr = _rope(q, ang_q), _rope(k, ang_q)
        out = torch.zeros_like(q)
        for b in range(B):
            if kv_cache:
                kc, vc = kv_cache[i]
                kc = kc[b if kc.shape[0] > 1 else 0].transpose(0, 1).to(DT)
                vc = vc[b if vc.shape[0] > 1 else 0].transpose(0, 1).to(DT)
                kc = _rope(kc[None], ang_c)[0]
                out[b] = _attend(q[b], torch.cat([kc, kr[b]]), torch.cat([vc, v[b]]))
            else:
                out[b, :nc] = _attend(q[b, :nc], kr[b, :nc], v[b, :nc])
                out[b, nc:] = _attend(q[b, nc:], kr[b], v[b])
        x = x + g_a * _lin(out.reshape(B, N, C), sd, p + "attn.proj")

        if not skip_crs_attn:
            hc = _layernorm(x, sd[p + "pre_crs_attn_norm.weight"], sd[p + "pre_crs_attn_norm.bias"])
            qc = _rmsnorm(_lin(hc, sd, p + "cross_attn.q_linear").view(B, N, heads, D), sd[p + "cross_attn.q_norm.weight"])
            kc, vc = _lin(y, sd, p + "cross_attn.kv_linear").view(B, y.shape[1], 2, heads, D).unbind(2)
            kc = _rmsnorm(kc, sd[p + "cross_attn.k_norm.weight"])
            oc = torch.zeros_like(qc)
            for b in range(B):
                oc[b, nc:] = _attend(qc[b, nc:], kc[b], vc[b], None if valid is None else valid[b])
            ca = _lin(oc.reshape(B, N, C), sd, p + "cross_attn.proj")
            ca[:, :nc] = 0  # conditioning tokens take no cross-attention output
            x = x + ca

        h = _layernorm(x) * (1 + sc_m) + sh_m
        f = _lin(F.silu(_lin(h, sd, p + "ffn.w1", bias=False)) * _lin(h, sd, p + "ffn.w3", bias=False), sd,
                 p + "ffn.w2", bias=False)
        x = x + g_m * f

    sh, sc = (per_frame(v) for v in _lin(F.silu(temb), sd, "final_layer.adaLN_modulation.1").chunk(2, -1))
    out = _lin(_layernorm(x) * (1 + sc) + sh, sd, "final_layer.linear")  # [B, N, 4*C_out]
    c_out = out.shape[-1] // 4
    out = out.view(B, T, Hp, Wp, 1, 2, 2, c_out).permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, c_out, T, H, W)
    return (out, kv_out) if return_kv else out


def random_official_state_dict(cfg, seed=0, dtype=torch.float32):
    """Random weights under the official names and shapes for an official config dict."""
    g = torch.Generator().manual_seed(seed)
    C, heads = cfg["hidden_size"], cfg["num_heads"]
    D = C // heads
    Cin, Cout, Ccap, Ct = cfg["in_channels"], cfg["out_channels"], cfg["caption_channels"], cfg["adaln_tembed_dim"]
    fe = cfg.get("frequency_embedding_size", 256)
    hidden = int(2 * int(C * cfg.get("mlp_ratio", 4)) / 3)
    Fh = 256 * ((hidden + 255) // 256)
    shapes = {
        "x_embedder.proj.weight": (C, Cin, 1, 2, 2), "x_embedder.proj.bias": (C,),
        "t_embedder.mlp.0.weight": (Ct, fe), "t_embedder.mlp.0.bias": (Ct,),
        "t_embedder.mlp.2.weight": (Ct, Ct), "t_embedder.mlp.2.bias": (Ct,),
        "y_embedder.y_proj.0.weight": (C, Ccap), "y_embedder.y_proj.0.bias": (C,),
        "y_embedder.y_proj.2.weight": (C, C), "y_embedder.y_proj.2.bias": (C,),
        "final_layer.adaLN_modulation.1.weight": (2 * C, Ct), "final_layer.adaLN_modulation.1.bias": (2 * C,),
        "final_layer.linear.weight": (4 * Cout, C), "final_layer.linear.bias": (4 * Cout,),
    }
    for i in range(cfg["depth"]):
        p = f"blocks.{i}."
        shapes.update({
            p + "adaLN_modulation.1.weight": (6 * C, Ct), p + "adaLN_modulation.1.bias": (6 * C,),
            p + "attn.qkv.weight": (3 * C, C), p + "attn.qkv.bias": (3 * C,),
            p + "attn.q_norm.weight": (D,), p + "attn.k_norm.weight": (D,),
            p + "attn.proj.weight": (C, C), p + "attn.proj.bias": (C,),
            p + "cross_attn.q_linear.weight": (C, C), p + "cross_attn.q_linear.bias": (C,),
            p + "cross_attn.kv_linear.weight": (2 * C, C), p + "cross_attn.kv_linear.bias": (2 * C,),
            p + "cross_attn.q_norm.weight": (D,), p + "cross_attn.k_norm.weight": (D,),
            p + "cross_attn.proj.weight": (C, C), p + "cross_attn.proj.bias": (C,),
            p + "pre_crs_attn_norm.weight": (C,), p + "pre_crs_attn_norm.bias": (C,),
            p + "ffn.w1.weight": (Fh, C), p + "ffn.w3.weight": (Fh, C), p + "ffn.w2.weight": (C, Fh),
        })
    sd = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            base = 1.0 if name.endswith("norm.weight") else 0.0
            t = base + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        sd[name] = t.to(dtype)
    return sd

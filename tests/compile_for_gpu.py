"""Compile every fused kernel for Hopper (sm_90) on a machine without a GPU.

The triton interpreter (how CPU tests run kernels) accepts code the GPU compiler rejects, so
this script runs each launcher with CPU tensors at the real model's sizes, intercepts the launch
and compiles the kernel to PTX/cubin for sm_90 instead. Run as a subprocess by
tests/test_kernels_compile_for_gpu.py (TRITON_INTERPRET must be unset before triton is imported).
Prints one line per compiled kernel and "compiled N" at the end.
"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import torch, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

TY = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int32: "*i32"}
results = []

def compile_instead_of_launch(self, *args, grid, warmup, **kwargs):
    names = self.arg_names
    bound = dict(zip(names, args)); bound.update({k: v for k, v in kwargs.items() if k in names})
    opts = {k: v for k, v in kwargs.items() if k not in names}
    sig, consts = {}, {}
    for i, p in enumerate(self.params):
        v = bound.get(p.name, p.default)
        if p.is_constexpr:
            sig[p.name] = "constexpr"; consts[(i,)] = v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = TY[v.dtype]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            sig[p.name] = "i64" if abs(v) >= 2**31 else "i32"
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError((p.name, v))
    src = ASTSource(self, sig, consts)
    target = GPUTarget("cuda", 90, 32)
    k = triton.compile(src, target=target, options={k: v for k, v in opts.items() if k in ("num_warps", "num_stages", "enable_fp_fusion")})
    results.append((self.fn.__name__, len(k.asm["ptx"]), k.metadata.shared))
    return None

JITFunction.run = compile_instead_of_launch
for m in ("layernorm_modulate", "residual_layernorm_modulate", "qk_rmsnorm_rope3d", "swiglu", "bsa_select", "block_sparse_attention"):
    mod = __import__(f"longcat_native.kernels.{m}", fromlist=["x"])
    mod.check_triton_device = lambda *a: None  # CPU tensors stand in for CUDA ones
from longcat_native.kernels import layernorm_modulate as L, residual_layernorm_modulate as R, qk_rmsnorm_rope3d as Q, swiglu as S
from longcat_native.kernels import block_sparse_attention as BSA, bsa_select as BSEL
for dt in (torch.bfloat16, torch.float16, torch.float32):
    B, N, C, T = 1, 64, 4096, 4
    x = torch.randn(B, N, C).to(dt); y = torch.randn(B, N, C).to(dt)
    mod6 = torch.randn(B, T, 6 * C).chunk(6, -1)
    w = torch.randn(C); bb = torch.randn(C)
    L._layernorm_modulate_launch(x, mod6[0], mod6[1], None, None, 1e-6, torch.empty_like(x))
    L._layernorm_modulate_launch(x, None, None, w.to(dt), bb.to(dt), 1e-6, torch.empty_like(x))
    L._layernorm_modulate_launch(torch.randn(1, 4, 16384).to(dt), None, None, None, None, 1e-6, torch.empty(1, 4, 16384, dtype=dt))
    R._residual_layernorm_modulate_launch(x, y, mod6[2], mod6[3], mod6[4], None, None, 1e-6, torch.empty_like(x), torch.empty_like(x))
    R._residual_layernorm_modulate_launch(x, y, None, mod6[3], mod6[4], None, None, 1e-6, torch.empty_like(x), torch.empty_like(x))
    R._residual_layernorm_modulate_launch(x, y, mod6[2], None, None, w.to(dt), bb.to(dt), 1e-6, torch.empty_like(x), torch.empty_like(x), _force_int64=True)
    xb = torch.randn(1, 4, 16384).to(dt)
    R._residual_layernorm_modulate_launch(xb, xb.clone(), None, None, None, None, None, 1e-6, torch.empty_like(xb), torch.empty_like(xb))
    S._swiglu_launch(torch.randn(2, 64, 2 * 11008).to(dt), torch.empty(2, 64, 11008, dtype=dt))
    qkv = torch.randn(1, 24, 3, 32, 128).to(dt)
    q, k, v = qkv.unbind(2)
    qw = torch.randn(128).to(dt)
    for grid in ((1, 4, 6), None):
        Q._qk_rmsnorm_rope3d_launch(q, k, qw, qw, grid, 0, 1e-6, torch.empty(1, 24, 32, 128, dtype=dt), torch.empty(1, 24, 32, 128, dtype=dt), torch.empty(1, 24, 32, 128, dtype=dt))
    # Block-sparse attention: pooling and the sparse kernel for the real chunks (4x4x4, 64 tokens),
    # head_dim 128 (the model), 64 and 96 (padded), q as a transposed view
    # of a [B, N, H, D] buffer (the model's layout), Tq != Tk, and forced int64 offsets. A small
    # grid stands in for 720p's 48x88x160: sizes enter the kernel as runtime ints, and the int64
    # variant is what needs_int64_offsets picks past 2**31 elements (720p's q|k|v buffer holds
    # 2.08e9 per batch item, just under: a CFG batch of 2 at 720p would take it).
    for D, chunk, grid_q, grid_k in ((128, (4, 4, 4), (8, 8, 8), (8, 8, 8)), (64, (4, 4, 8), (4, 8, 16), (8, 8, 16)),
                                     (96, (2, 4, 4), (4, 8, 8), (4, 8, 8))):
        Hh = 2
        nq, nk = grid_q[0] * grid_q[1] * grid_q[2], grid_k[0] * grid_k[1] * grid_k[2]
        qt = torch.randn(1, nq, Hh, D).to(dt).transpose(1, 2)
        kk = torch.randn(1, Hh, nk, D).to(dt); vv = torch.randn(1, Hh, nk, D).to(dt)
        gq, gk = BSEL._geometry(grid_q, chunk), BSEL._geometry(grid_k, chunk)
        BSEL._bsa_pool_launch(qt, gq, torch.empty(1, Hh, gq.n_chunks, D))
        idx = torch.zeros(1, Hh, gq.n_chunks, 3, dtype=torch.int32); cnt = torch.ones(1, Hh, gq.n_chunks, dtype=torch.int32)
        BSA._bsa_attention_launch(qt, kk, vv, idx, cnt, gq, gk, torch.empty_like(qt), D ** -0.5)
        BSA._bsa_attention_launch(qt, kk, vv, idx, cnt, gq, gk, torch.empty_like(qt), D ** -0.5, _force_int64=True)
        BSEL._bsa_pool_launch(kk, gk, torch.empty(1, Hh, gk.n_chunks, D), _force_int64=True)
for r in results: print(r)
print("compiled", len(results))

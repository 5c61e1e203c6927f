"""Profiling (runtime/profiling.py): NVTX ranges are a free no-op when off and invisible to
torch.compile, they group a torch.profiler run, and `longcat-native profile` writes a trace."""

import json
import os
import subprocess
import sys

import torch

import longcat_native as lcn
from longcat_native.cli import main
from longcat_native.runtime import profiling
from longcat_native.runtime.profiling import enable_nvtx, nvtx_range, profile_forward


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(3)])

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            with nvtx_range("block", i):
                with nvtx_range("op.linear"):
                    x = torch.relu(layer(x))
        return x


def test_disabled_ranges_are_one_shared_null_context():
    previous = enable_nvtx(False)
    try:
        assert nvtx_range("a") is nvtx_range("block", 3)
        with nvtx_range("block", 0):
            pass
    finally:
        enable_nvtx(previous)


def test_forced_range_marks_a_region_while_ranges_are_off():
    """``force=True`` (the benchmarks' timed regions) is a real range whatever the setting."""
    previous = enable_nvtx(False)
    try:
        forced = nvtx_range("bench", force=True)
        assert forced is not nvtx_range("bench") and isinstance(forced, profiling._Range)
        with torch.profiler.profile() as prof, forced:
            torch.ones(2) + 1
        assert "bench" in {e.name for e in prof.events()}
    finally:
        enable_nvtx(previous)


def test_ranges_compile_fullgraph_without_breaks_enabled_or_not():
    toy, x = _Toy(), torch.randn(2, 8)
    for enabled in (False, True):
        previous = enable_nvtx(enabled)
        try:
            torch._dynamo.reset()
            explained = torch._dynamo.explain(toy)(x)
            assert explained.graph_break_count == 0 and explained.graph_count == 1
            out = torch.compile(toy, fullgraph=True, backend="eager")(x)
            assert torch.allclose(out, toy(x))
        finally:
            enable_nvtx(previous)
    torch._dynamo.reset()


def test_tiny_dit_explain_no_breaks_with_ranges_enabled():
    dit = lcn.LongCatDiT.from_config("tiny", depth=1)
    args = (torch.randn(1, 16, 2, 4, 4), torch.rand(1) * 1000, torch.randn(1, 1, 3, 64))
    previous = enable_nvtx(True)
    try:
        torch._dynamo.reset()
        assert torch._dynamo.explain(dit)(*args).graph_break_count == 0
        with torch.no_grad():
            on = dit(*args)  # eager, ranges active: same numbers
        enable_nvtx(False)
        with torch.no_grad():
            off = dit(*args)
        assert torch.equal(on, off)
    finally:
        enable_nvtx(previous)
        torch._dynamo.reset()


def test_env_var_enables_ranges():
    code = "from longcat_native.runtime.profiling import nvtx_enabled; print(nvtx_enabled())"
    env = dict(os.environ, LONGCAT_NVTX="1", PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr


def test_profile_forward_groups_by_range(tmp_path):
    dit = lcn.LongCatDiT.from_config("tiny", depth=2)
    args = (torch.randn(1, 16, 2, 4, 4), torch.rand(1) * 1000, torch.randn(1, 1, 3, 64))
    trace = tmp_path / "t.json"
    with torch.no_grad():
        result = profile_forward(lambda: dit(*args), steps=2, trace_path=str(trace))
    assert not profiling.nvtx_enabled()  # restored
    assert trace.exists() and json.loads(trace.read_text())["traceEvents"]
    ranges = {r["range"] for r in result["rows"]}
    assert any(r.startswith("op.") for r in ranges)
    assert any(r["op"] in ("aten::addmm", "aten::mm", "aten::linear") for r in result["rows"])
    assert abs(sum(r["share"] for r in result["ranges"]) - 1.0) < 1e-6
    assert result["steps"] == 2 and result["total_self_us"] > 0


def test_profile_cli_writes_trace_and_prints_table(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    assert main(["profile", "--latent", "2", "4", "4", "--steps", "1", "--trace", str(trace), "--top", "5",
                 "--kernels", "reference"]) == 0
    out = capsys.readouterr().out
    assert trace.exists() and trace.stat().st_size > 0
    assert "top ops by cpu self time" in out and "share" in out and "by range" in out
    assert "nsys profile" in out and "LONGCAT_NVTX=1" in out

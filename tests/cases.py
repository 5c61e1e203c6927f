"""Reading the golden cases of tests/fixtures/longcat_tiny/cases (see its README)."""

import json
import pathlib

from safetensors import safe_open
from safetensors.torch import load_file

FIXTURE_ROOT = pathlib.Path(__file__).parent / "fixtures" / "longcat_tiny"
CASES_DIR = FIXTURE_ROOT / "cases"

# Cases that exercise the plain forward (LoRA, BSA and sampling cases belong to their own issues).
FORWARD_CASES = ["t2v_nomask", "t2v_mask", "t2v_mask_varlen", "per_frame_timestep", "i2v_cond1",
                 "skip_cross_attn", "kv_prefill", "kv_continue"]


def load_case(name):
    """-> (inputs dict, kv_cache_dict or None, expected dict, meta dict)."""
    path = CASES_DIR / f"{name}.safetensors"
    with safe_open(str(path), "pt") as st:
        meta = json.loads(st.metadata()["meta"])
    tensors = load_file(str(path))
    inputs, expected, kv_in, kv_out = {}, {}, {}, {}
    for key, t in tensors.items():
        side, rest = key.split(".", 1)
        if rest.startswith("kv."):
            _, block, which = rest.split(".")
            (kv_in if side == "in" else kv_out).setdefault(int(block), {})[which] = t
        elif side == "in":
            inputs[rest] = t
        else:
            expected[rest] = t
    if kv_out:
        expected["kv"] = {b: (d["k"], d["v"]) for b, d in kv_out.items()}
    kv = {b: (d["k"], d["v"]) for b, d in kv_in.items()} or None
    return inputs, kv, expected, meta

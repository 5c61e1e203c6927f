"""Every benchmark in one command, with the results filed the way the project keeps them.

    python bench/suite.py                                 # all benches, their default sizes
    python bench/suite.py --only fused_kernels,block,attention  # a subset (a lent GPU's call is 10 minutes:
    python bench/suite.py --only model                    #  split the suite over calls; files merge)
    python bench/suite.py --merge a.json b.json           # merge result files fetched from separate calls
    python bench/suite.py --only model --tag 720p --args 'model=--size 720p'  # filed as "model:720p"

Runs each ``bench/<name>.py`` as its own process (so one crash or OOM does not take the others
down), at each script's default sizes: docs/workloads.md's real shapes on CUDA, small ones on the
CPU. Each script's last stdout line is its JSON record of headline figures; the suite collects
them with the script's exit code, wall time and the tail of its output, and on CUDA (or with
``--save``) writes ``<out-dir>/<date>-<gpu>.json`` (merged into an existing file of that name, so
runs of several subsets on one device and day add up) and ``<out-dir>/<date>-<gpu>.md`` (a table of
every headline figure, rewritten from the merged JSON). Records are keyed by bench name, so a later
run of the same bench replaces the earlier one; ``--tag T`` files them as ``<name>:T`` instead
(two model runs of different sizes in one day's file). Prints the markdown table last and ends
with one JSON line ``{"bench": "suite", ...}``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

from longcat_native.runtime.files import write_json_atomic, write_text_atomic

_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_BENCH_DIR)

BENCHES = ("fused_kernels", "block", "attention", "block_sparse_attention", "lora", "model", "parallel", "quantize",
           "streaming", "step_cache")


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'; a CPU description -> 'cpu'."""
    if name.startswith("cpu"):
        return "cpu"
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w and w != "nvidia"]
    return "-".join(words) or "gpu"


def run_one(name: str, extra: List[str], timeout_s: float) -> Dict[str, Any]:
    argv = [sys.executable, os.path.join(_BENCH_DIR, f"{name}.py"), *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=_REPO, capture_output=True, text=True, timeout=timeout_s, env=env)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc = None
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = f"timed out after {timeout_s} s"
    record: Optional[Dict[str, Any]] = None
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                pass
            break
    return {"argv": argv[1:], "returncode": rc, "seconds": time.perf_counter() - t0, "record": record,
            "stdout_tail": out[-6000:], "stderr_tail": err[-3000:]}


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)[:80]
    return str(v)


def markdown(results: Dict[str, Any]) -> str:
    lines = [f"# Benchmarks on {results['device']} ({results['date']})", "",
             f"torch {results['torch']}, triton {results['triton']}, commit {results['commit']}. "
             "Each bench's headline figures (its final JSON line); full tables in the JSON's stdout tails.", ""]
    for name in sorted(results["benches"]):
        b = results["benches"][name]
        status = "ok" if b["returncode"] == 0 else f"FAILED (exit {b['returncode']})"
        lines += [f"## {name}: {status}, {b['seconds']:.0f} s", "", "| figure | value |", "|---|---|"]
        for k, v in (b["record"] or {}).items():
            if k != "bench":
                lines.append(f"| `{k}` | {_fmt(v)} |")
        if b["returncode"] != 0:
            tail = (b["stderr_tail"] or b["stdout_tail"]).strip().splitlines()[-3:]
            lines += ["", "```", *tail, "```"]
        lines.append("")
    return "\n".join(lines)


def _write(results: Dict[str, Any], out_dir: str) -> str:
    """Write ``results`` as ``<out_dir>/<date>-<gpu>.json`` merged into what is there, and the
    ``.md`` table of the merged whole; returns the path stem."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{results['date']}-{device_slug(results['device'])}")
    merged = results
    if os.path.exists(stem + ".json"):
        with open(stem + ".json", encoding="utf-8") as f:
            merged = json.load(f)
        merged["benches"].update(results["benches"])
        merged.update({k: results[k] for k in ("torch", "triton", "commit")})
    # Each file complete or as it was (an interrupted run never leaves half a JSON file).
    write_json_atomic(stem + ".json", merged, indent=1)
    write_text_atomic(stem + ".md", markdown(merged))
    return stem


def merge_files(paths: List[str], out_dir: str) -> int:
    loaded = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            loaded.append(json.load(f))
    keys = {(r["date"], r["device"]) for r in loaded}
    if len(keys) != 1:
        raise SystemExit(f"suite --merge: the files are from different days or devices: {sorted(keys)}")
    for r in loaded:
        stem = _write(r, out_dir)
    print(f"results: {stem}.json, {stem}.md")
    return 0


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {', '.join(BENCHES)}")
    p.add_argument("--timeout-s", type=float, default=540.0, help="per bench (default 540: fits a 10-minute call)")
    p.add_argument("--save", action="store_true", help="write the files on the CPU too (always on CUDA)")
    p.add_argument("--out-dir", default=os.path.join(_BENCH_DIR, "results"))
    p.add_argument("--args", action="append", default=[], metavar="NAME=ARGS",
                   help="extra arguments for one bench, e.g. --args 'model=--depth 8' (repeatable)")
    p.add_argument("--tag", default=None,
                   help="file the records as NAME:TAG (keeps several runs of one bench in the day's file)")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="run nothing: merge these suite result files (one device and day) into --out-dir")
    args = p.parse_args(argv)
    if args.merge:
        return merge_files(args.merge, args.out_dir)

    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        p.error(f"unknown bench {unknown}; choose from {', '.join(BENCHES)}")
    if args.tag is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", args.tag):
        p.error(f"--tag {args.tag!r}: letters, digits, '.', '_' and '-' only")
    extra: Dict[str, List[str]] = {}
    for spec in args.args:
        name, _, rest = spec.partition("=")
        if name not in BENCHES:
            p.error(f"--args {spec!r}: unknown bench {name!r}")
        extra[name] = rest.split()

    import torch
    import triton  # noqa: F401  (version only; the benches set the interpreter themselves)

    from longcat_native.benchmarking.harness import device_name, emit_json

    on_cuda = torch.cuda.is_available()
    device = device_name(torch.device("cuda" if on_cuda else "cpu"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_REPO, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    date = time.strftime("%Y-%m-%d")
    results: Dict[str, Any] = {"date": date, "device": device, "torch": torch.__version__,
                               "triton": sys.modules["triton"].__version__, "commit": commit, "benches": {}}
    filed = [name if args.tag is None else f"{name}:{args.tag}" for name in names]
    saved = None
    for name, key in zip(names, filed):
        print(f"suite: {key} ...", flush=True)
        r = run_one(name, extra.get(name, []), args.timeout_s)
        print(f"suite: {key}: exit {r['returncode']}, {r['seconds']:.1f} s", flush=True)
        if on_cuda or args.save:
            # Filed after each bench: a device call cut off later still returns what finished.
            saved = _write({**results, "benches": {key: r}}, args.out_dir)
        results["benches"][key] = r

    if saved:
        with open(saved + ".json", encoding="utf-8") as f:
            results = json.load(f)
    print(markdown(results))
    if saved:
        print(f"results: {saved}.json, {saved}.md")
    failed = sorted(k for k in filed if results["benches"][k]["returncode"] != 0)
    emit_json({"bench": "suite", "device": device, "benches_run": len(names), "benches_failed": failed,
               "results_path": None if saved is None else saved + ".json"})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

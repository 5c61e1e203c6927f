"""Multi-process tests on gloo: the launcher side (start ``world`` copies of a worker script the way
torchrun would, with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment, and read back
the JSON report each rank writes) and the worker side (:func:`worker_main`, :func:`expect_error`).

Never a hang: the launch has a deadline, and a rank that fails ends the others, at once or after
``grace_s`` in which they may fail on their own (what a test of the failure path measures).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

REPO = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Launch:
    """How the ranks ended: exit codes, seconds from the start to each rank's exit (None: killed),
    and where the logs are."""

    codes: List[int]
    ended: List[float]
    tmp_path: Path

    def log(self, rank: int, tail: int = 4000) -> str:
        return (self.tmp_path / f"log{rank}.txt").read_text()[-tail:]

    @property
    def failed(self) -> List[int]:
        return [r for r, c in enumerate(self.codes) if c != 0]


def launch(worker: Path, world: int, tmp_path: Path, args: Sequence[str] = (), timeout_s: float = 300,
           grace_s: float = 0.0, **env) -> Launch:
    """Run ``world`` copies of ``python worker tmp_path *args``; each rank's output goes to
    ``tmp_path/log<r>.txt``. Once a rank exits non-zero the others get ``grace_s`` seconds to end,
    then are killed; past ``timeout_s`` every rank is killed and the test fails (a hang)."""
    import pytest

    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world),
                LONGCAT_CP_TIMEOUT_S="120", OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    base.update(env)
    logs = [open(tmp_path / f"log{r}.txt", "w") for r in range(world)]
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, str(worker), str(tmp_path), *args],
                              env=dict(base, RANK=str(r), LOCAL_RANK=str(r)), stdout=logs[r], stderr=subprocess.STDOUT)
             for r in range(world)]
    ended: List[float] = [None] * world
    kill_at, timed_out = None, False
    try:
        while any(e is None for e in ended):
            now = time.monotonic()
            for r, p in enumerate(procs):
                if ended[r] is None and p.poll() is not None:
                    ended[r] = now - start
                    if p.returncode != 0 and kill_at is None:
                        kill_at = now + grace_s
            if kill_at is not None and now >= kill_at:
                break
            if now - start > timeout_s:
                timed_out = True
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in logs:
            f.close()
    result = Launch([p.returncode for p in procs], ended, tmp_path)
    if timed_out:
        pytest.fail(f"{worker.name}: the ranks did not finish in {timeout_s} s (a hang); rank 0's log:\n{result.log(0)}")
    return result


def reports(result: Launch, crash_ok: bool = False) -> List[dict]:
    """Every rank's ``rank<r>.json``; a missing report, or (unless ``crash_ok``) a failed rank,
    fails the test with that rank's log or traceback."""
    import pytest

    if result.failed and not crash_ok:
        pytest.fail(f"rank(s) {result.failed} failed (the others were ended); their logs:\n"
                    + "\n".join(f"--- rank {r}\n{result.log(r)}" for r in result.failed))
    out = []
    for r in range(len(result.codes)):
        path = result.tmp_path / f"rank{r}.json"
        if not path.exists():
            pytest.fail(f"rank {r} wrote no report; its log:\n{result.log(r)}")
        rep = json.loads(path.read_text())
        if "crash" in rep and not crash_ok:
            pytest.fail(f"rank {r} crashed:\n{rep['crash']}")
        out.append(rep)
    return out


# -- the worker side ---------------------------------------------------------------------------------

def expect_error(fn, exc_type=ValueError) -> dict:
    """What ``fn()`` raised: ``{"raised": name, "message": ...}`` (``"wrong_type": True`` when it
    was not ``exc_type``), or ``{"raised": None}``."""
    try:
        fn()
    except exc_type as e:
        return {"raised": type(e).__name__, "message": str(e)}
    except Exception as e:
        return {"raised": type(e).__name__, "message": str(e), "wrong_type": True}
    return {"raised": None}


def worker_main(run, out_dir, *args) -> None:
    """A worker's whole life: ``run(report, world, *args)`` fills the report (``cases``,
    ``errors``, ``checks``, ``timings``), which is written to ``out_dir/rank<r>.json``; a crash
    is recorded there and on stderr. The process leaves at once with 0 or 1: no teardown that
    could wait on a peer that failed (the peers see the closed connection)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    report = {"rank": rank, "world": world, "cases": {}, "errors": {}, "checks": {}, "timings": {}}
    t0 = time.perf_counter()
    code = 0
    try:
        run(report, world, *args)
    except BaseException:
        report["crash"] = traceback.format_exc()
        code = 1
    report["seconds"] = time.perf_counter() - t0
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f, indent=1)
    sys.stdout.flush()
    if code:
        sys.stderr.write(report["crash"])
        sys.stderr.flush()
    os._exit(code)

"""No script or test module shadows an installed package.

pytest puts ``tests/`` and ``bench/`` on ``sys.path`` (rootdir conftests, prepend import mode),
and ``python bench/x.py`` puts ``bench/`` first, so a file there named like an installed
distribution's top-level module replaces it for every import in the process. It happened:
transformers 5 depends on Hugging Face's ``kernels`` package and imports it while loading
umT5/diffusers, and ``bench/kernels.py`` (now ``bench/fused_kernels.py``) answered instead,
which broke 99 tests.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("tests", "bench")


def _installed_top_level_names() -> set:
    names = set()
    for dist in importlib.metadata.distributions():
        top = dist.read_text("top_level.txt")
        if top:
            names.update(n.strip() for n in top.split() if n.strip())
        for f in dist.files or ():
            parts = Path(str(f)).parts
            if parts and not parts[0].endswith((".dist-info", ".egg-info", ".data")) and parts[0] != "..":
                head = parts[0]
                names.add(head[:-3] if head.endswith(".py") else head)
    return names


def test_no_script_or_test_module_is_named_like_an_installed_package():
    installed = _installed_top_level_names()
    assert "torch" in installed and "pytest" in installed  # the scan sees what is installed
    ours = {p.stem: p for d in FOLDERS for p in (REPO / d).glob("*.py")}
    clashes = sorted(f"{p.relative_to(REPO)} shadows the installed '{name}'"
                     for name, p in ours.items() if name in installed and name != "conftest")
    assert not clashes, "; ".join(clashes) + ": rename the file"

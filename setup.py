"""Install longcat-native. Builds nothing native yet: csrc/ is compiled only where a CUDA
toolchain and a CUDA build of torch exist, and nothing there needs compiling in this version,
so a CPU-only machine installs cleanly."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "longcat_native" / "__init__.py").read_text()).group(1)

setup(
    name="longcat-native",
    version=VERSION,
    description="A compiled, kernel-optimized inference runtime for the LongCat-Video DiT",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["longcat_native", "longcat_native.*"]),
    install_requires=["torch>=2.6", "triton", "safetensors", "numpy"],
    extras_require={
        "cuda": ["flash-attn", "nvtx"],
        "dev": ["pytest", "pytest-benchmark", "hypothesis"],
        # Prompt strings (umT5 text encoder) and decoded video (Wan VAE) in the pipelines.
        "pipelines": ["transformers", "diffusers", "sentencepiece"],
    },
    entry_points={"console_scripts": ["longcat-native = longcat_native.cli:main"]},
    license="MIT",
)

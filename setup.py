"""Install longcat-native. Builds nothing native yet: csrc/ is compiled only where a CUDA
toolchain and a CUDA build of torch exist, and nothing there needs compiling in this version,
so a CPU-only machine installs cleanly."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
PIPELINES = ["transformers>=4.40", "diffusers>=0.34", "sentencepiece", "ftfy", "pillow", "imageio", "imageio-ffmpeg"]
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
        # The tests build tiny text encoders/VAEs and write .mp4 files: they need the pipelines extra.
        # pytest-xdist: the suite runs on every core (-n 2 on the 2-core CI machine: about half the time)
        # The step cache's oracle, cache-dit 1.5.3, is installed with --no-deps by the test command
        # (its own extras pull in ray/torchao/...); these are the floors it declares for what it imports.
        "dev": ["pytest", "pytest-benchmark", "pytest-xdist", "hypothesis", *PIPELINES,
                "diffusers>=0.36", "transformers>=4.55.2", "packaging", "pyyaml"],
        # Prompt strings (umT5 text encoder: transformers, sentencepiece for the umT5 tokenizer,
        # ftfy for the official prompt cleaning), the Wan VAE (diffusers), image/video files
        # (pillow, imageio) and .mp4 output (imageio-ffmpeg, which ships an ffmpeg binary).
        "pipelines": PIPELINES,
    },
    entry_points={"console_scripts": ["longcat-native = longcat_native.cli:main"]},
    license="MIT",
)

"""A tiny checkpoint root in the official layout, built once per test session, offline:
``tokenizer/`` (a word-level tokenizer made with the ``tokenizers`` library, saved by
``PreTrainedTokenizerFast.save_pretrained``), ``text_encoder/`` (a randomly initialized
``UMT5EncoderModel`` with d_model = the tiny DiT's caption_channels), ``vae/`` (a randomly
initialized ``AutoencoderKLWan`` with the real strides, 4x in time and 8x in space, and tiny
channel counts), and ``dit/`` + ``lora/`` linked from the golden fixture.

Use the ``tiny_root`` fixture (import it into the test module); the folder is built on first use
and shared by every module of the session."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from cases import FIXTURE_ROOT

# Words of the prompts the tests use; anything else maps to <unk>.
VOCAB_WORDS = ("a cat dog walking running on the grass in park sun is shining bright static blurred red blue "
               "video of an & and").split()
TEXT_TOKENS = 512
_BUILT = {}


def _caption_channels() -> int:
    return int(json.loads((Path(FIXTURE_ROOT) / "dit" / "config.json").read_text())["caption_channels"])


def build_tiny_root(root: Path) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel
    from diffusers import AutoencoderKLWan

    root.mkdir(parents=True, exist_ok=True)
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in VOCAB_WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # like T5: an end-of-sequence token after every text
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                            model_max_length=TEXT_TOKENS).save_pretrained(str(root / "tokenizer"))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        cfg = UMT5Config(vocab_size=len(vocab), d_model=_caption_channels(), d_kv=16, d_ff=96, num_layers=2,
                         num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                         pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        UMT5EncoderModel(cfg).save_pretrained(str(root / "text_encoder"))
        vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
        vae.save_pretrained(str(root / "vae"))
    for name in ("dit", "lora"):
        target = Path(FIXTURE_ROOT) / name
        try:
            os.symlink(target, root / name, target_is_directory=True)
        except OSError:  # no symlinks here: copy (small)
            shutil.copytree(target, root / name)
    return root


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """The tiny root (built once per session, whichever module asks first)."""
    if "root" not in _BUILT:
        _BUILT["root"] = build_tiny_root(tmp_path_factory.mktemp("tiny_ckpt") / "LongCat-Tiny")
    return _BUILT["root"]


def partial_root(tiny_root: Path, dest: Path, without=()) -> Path:
    """A copy of the tiny root (linked parts) lacking the folders in ``without``."""
    dest.mkdir(parents=True, exist_ok=True)
    for part in tiny_root.iterdir():
        if part.name not in without:
            os.symlink(part.resolve(), dest / part.name, target_is_directory=part.is_dir())
    return dest

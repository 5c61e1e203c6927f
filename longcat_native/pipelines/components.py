"""The components around the DiT in a checkpoint root (``tokenizer/``, ``text_encoder/``,
``vae/``, ``scheduler/`` beside the official ``dit/`` or a FastVideo Diffusers root's
``transformer/``, whose ``model_index.json`` is checked: :func:`check_model_index`): the umT5 text encoder with its tokenizer
(``transformers``; prompts cleaned and padded to 512 tokens as officially), the Wan VAE
(``diffusers``; the posterior sampled or its mean, latents normalized per channel, no tiling
unless asked) and the flow-matching scheduler's settings. Missing folders are errors before any
loading.

Design notes: docs/design/pipelines.md.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import re
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from dataclasses import dataclass

import torch

from .media import require

__all__ = [
    "TOKENIZER_DIR", "TEXT_ENCODER_DIR", "VAE_DIR", "DIT_DIR", "MAX_TEXT_TOKENS", "checkpoint_root",
    "check_components", "component_config", "clean_prompt", "TextEncoder", "VideoVAE", "SchedulerConfig",
    "SCHEDULER_DIR", "MODEL_INDEX", "check_model_index",
]

TOKENIZER_DIR, TEXT_ENCODER_DIR, VAE_DIR, DIT_DIR = "tokenizer", "text_encoder", "vae", "dit"
SCHEDULER_DIR = "scheduler"
MAX_TEXT_TOKENS = 512  # the official max_sequence_length; the DiT was trained on 512 padded tokens
# diffusers' defaults for the Wan VAE tiles, in pixels: 256 x 256 tiles every 192 pixels.
DEFAULT_TILE, DEFAULT_TILE_STRIDE = (256, 256), (192, 192)


# -- checkpoint layout ---------------------------------------------------------------------------

def checkpoint_root(path) -> Path:
    """The checkpoint root for ``path``: the root itself, or the parent of a ``dit/`` folder."""
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path {str(p)!r} does not exist")
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint path {str(p)!r} is not a folder")
    if (p / "config.json").is_file() and not (p / DIT_DIR).is_dir():  # a dit/ folder
        return p.parent
    return p


# (folder, file that must be in it, what it is)
_PARTS = {
    TOKENIZER_DIR: ("tokenizer_config.json", "the tokenizer"),
    TEXT_ENCODER_DIR: ("config.json", "the umT5 text encoder"),
    VAE_DIR: ("config.json", "the Wan VAE"),
}


def check_components(root, text_encoder: bool = False, vae: bool = False, caption_channels: Optional[int] = None,
                     latent_channels: Optional[int] = None) -> Path:
    """Check that the folders of the asked components exist with their config files and, when
    the DiT's ``caption_channels`` / ``latent_channels`` (in_channels) are given, that the text
    encoder's ``d_model`` and the VAE's ``z_dim`` match them. Reads only config files. Returns
    the root; errors name the folder."""
    root = checkpoint_root(root)
    wanted = ([TOKENIZER_DIR, TEXT_ENCODER_DIR] if text_encoder else []) + ([VAE_DIR] if vae else [])
    for name in wanted:
        marker, what = _PARTS[name]
        folder = root / name
        if not folder.is_dir():
            raise FileNotFoundError(f"checkpoint {str(root)!r} has no {name}/ folder ({what}); the official layout "
                                    f"has tokenizer/, text_encoder/, vae/, dit/, lora/ under the root (a Diffusers "
                                    f"root: transformer/ instead of dit/)")
        if not (folder / marker).is_file():
            raise FileNotFoundError(f"{str(folder)!r} has no {marker}: not a saved {what}")
    if text_encoder and caption_channels is not None:
        d_model = component_config(root, TEXT_ENCODER_DIR).get("d_model")
        if d_model != caption_channels:
            raise ValueError(f"{str(root / TEXT_ENCODER_DIR)!r}: d_model {d_model} does not match the DiT's "
                             f"caption_channels {caption_channels}")
    if vae and latent_channels is not None:
        z_dim = component_config(root, VAE_DIR).get("z_dim", 16)  # diffusers' default when not saved
        if z_dim != latent_channels:
            raise ValueError(f"{str(root / VAE_DIR)!r}: z_dim {z_dim} does not match the DiT's in_channels "
                             f"{latent_channels}")
    return root


MODEL_INDEX = "model_index.json"
# FastVideo's LongCat pipelines (model_index.json's _class_name): one DiT, the same components.
DIFFUSERS_PIPELINES = ("LongCatPipeline", "LongCatImageToVideoPipeline", "LongCatVideoContinuationPipeline")
# component -> the classes model_index.json may name for it (what FastVideo's repos and converter write;
# the official DiT class too, for a transformer/ holding official names)
COMPONENT_CLASSES = {
    "transformer": ("LongCatTransformer3DModel", "LongCatVideoTransformer3DModel"),
    "vae": ("AutoencoderKLWan",),
    "text_encoder": ("UMT5EncoderModel",),
    "tokenizer": ("AutoTokenizer", "T5TokenizerFast", "T5Tokenizer"),
    "scheduler": ("FlowMatchEulerDiscreteScheduler",),
}


def check_model_index(root, text_encoder: bool = False, vae: bool = False) -> dict:
    """Check a Diffusers root's ``model_index.json``: a FastVideo LongCat pipeline
    (``_class_name`` one of :data:`DIFFUSERS_PIPELINES`), every component ``[library, class]`` with
    a class that component can be (:data:`COMPONENT_CLASSES`; ``[null, null]``: not there), no
    component this loader does not know, and the folder of every component this load reads
    (``transformer``, the ``scheduler`` when listed, ``tokenizer`` + ``text_encoder`` and ``vae``
    when asked) listed and on disk. Errors name the component. Returns the index."""
    path = checkpoint_root(root) / MODEL_INDEX
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{str(path)!r} does not exist (a Diffusers root lists its components there)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e})") from None
    if not isinstance(index, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object")
    if index.get("_class_name") not in DIFFUSERS_PIPELINES:
        raise ValueError(f"{str(path)!r}: _class_name {index.get('_class_name')!r} is not a LongCat pipeline "
                         f"(FastVideo's {', '.join(DIFFUSERS_PIPELINES)})")
    listed = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, (list, tuple)):
            continue  # bookkeeping (_diffusers_version) and settings (workload_type)
        if name not in COMPONENT_CLASSES:
            raise ValueError(f"{str(path)!r} lists a component {name!r} this loader does not know (it reads "
                             f"{', '.join(COMPONENT_CLASSES)})")
        if len(value) != 2:
            raise ValueError(f"{str(path)!r}: component {name!r} must be [library, class], got {value!r}")
        if value[1] is None:
            continue  # [null, null]: the pipeline has no such component
        if value[1] not in COMPONENT_CLASSES[name]:
            raise ValueError(f"{str(path)!r}: component {name!r} is a {value[1]!r}; longcat-native reads it as "
                             f"{' or '.join(COMPONENT_CLASSES[name])}")
        listed[name] = value
    needed = ["transformer"] + (["scheduler"] if "scheduler" in listed else []) \
        + (["tokenizer", "text_encoder"] if text_encoder else []) + (["vae"] if vae else [])
    for name in needed:
        if name not in listed:
            hint = {"vae": " (pass vae=False to load without it)",
                    "tokenizer": " (pass text_encoder=False to load without it)",
                    "text_encoder": " (pass text_encoder=False to load without it)"}.get(name, "")
            raise ValueError(f"{str(path)!r} lists no {name}{hint}")
        if not (path.parent / name).is_dir():
            raise FileNotFoundError(f"{str(path)!r} lists the component {name} ({listed[name][1]}) but "
                                    f"{str(path.parent / name)!r} does not exist")
    return index


def component_config(root, name: str) -> dict:
    """The config.json of a component folder (cheap: for consistency checks before loading)."""
    path = checkpoint_root(root) / name / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{str(path)!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e})") from None


def _resolve(device, dtype) -> Tuple[torch.device, torch.dtype]:
    from ..runtime.dit import resolve_dtype

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return device, resolve_dtype(dtype, device)


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """transformers 5 renamed ``torch_dtype`` to ``dtype``; loading in the target dtype directly
    matters (the umT5-XXL encoder is ~11 GB in bf16, twice that if loaded as float32 first)."""
    transformers = require("transformers")
    major = int(str(transformers.__version__).split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def _free_cuda_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- text ----------------------------------------------------------------------------------------

def clean_prompt(text: str) -> str:
    """The official prompt cleaning: ftfy's fixes, HTML entities unescaped (twice), whitespace
    runs collapsed to one space, ends stripped."""
    if not isinstance(text, str):
        raise ValueError(f"a prompt must be a string, got {type(text).__name__}")
    ftfy = require("ftfy")
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def prompt_list(prompts, what: str = "prompt") -> List[str]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, str) for p in prompts):
        return list(prompts)
    raise ValueError(f"{what} must be a string or a non-empty list of strings, got {prompts!r}")


class TextEncoder:
    """The umT5 encoder and its tokenizer. The model stays in host memory until :meth:`encode`
    moves it to ``device``; :meth:`offload` moves it back (the pipelines do so once the prompts
    are encoded, so the DiT's denoising never shares the GPU with it)."""

    def __init__(self, tokenizer, model, *, device=None, max_length: int = MAX_TEXT_TOKENS):
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        self.tokenizer, self.model, self.max_length = tokenizer, model.eval(), max_length
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        for p in self.model.parameters():
            p.requires_grad_(False)
        # Sequential offload (LongCatVideoPipeline.enable_sequential_cpu_offload): the encoder
        # stays in host memory and each top-level piece visits the device for its own forward.
        self.layer_by_layer = False

    @classmethod
    def from_pretrained(cls, root, *, dtype=None, device=None, max_length: int = MAX_TEXT_TOKENS) -> "TextEncoder":
        """Load ``root/tokenizer`` and ``root/text_encoder`` (into host memory, in ``dtype``:
        default bfloat16 when ``device`` is CUDA, float32 otherwise)."""
        root = check_components(root, text_encoder=True)
        device, dtype = _resolve(device, dtype)
        transformers = require("transformers")
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(root), subfolder=TOKENIZER_DIR)
        except (OSError, ValueError) as e:
            raise ValueError(f"{str(root / TOKENIZER_DIR)!r}: the tokenizer could not be loaded ({e})") from None
        model = transformers.UMT5EncoderModel.from_pretrained(str(root), subfolder=TEXT_ENCODER_DIR,
                                                              **_dtype_kwarg(dtype))
        return cls(tokenizer, model, device=device, max_length=max_length)

    @property
    def caption_channels(self) -> int:
        return int(self.model.config.d_model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def tokenize(self, prompts: Union[str, Sequence[str]], max_length: Optional[int] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Cleaned prompts -> (input ids [B, L], attention mask [B, L] int64), L = ``max_length``
        (the official ``max_sequence_length``; default this encoder's, 512)."""
        max_length = self.max_length if max_length is None else max_length
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_sequence_length must be a positive int, got {max_length!r}")
        prompts = [clean_prompt(p) for p in prompt_list(prompts)]
        enc = self.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"].to(torch.int64)

    @torch.no_grad()
    def encode(self, prompts: Union[str, Sequence[str]], dtype: Optional[torch.dtype] = None,
               max_length: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Prompt(s) -> (embeddings [B, 1, L, C] in ``dtype`` (default the encoder's), mask [B, L]),
        both on ``self.device`` (L = ``max_length``, default 512). The encoder stays there until
        :meth:`offload`."""
        ids, mask = self.tokenize(prompts, max_length)
        ids, mask = ids.to(self.device), mask.to(self.device)
        if self.layer_by_layer:
            with _one_piece_at_a_time(self.model, self.device):
                hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        else:
            if next(self.model.parameters()).device != self.device:
                self.model.to(self.device)
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        embeds = hidden.to(dtype or hidden.dtype).unsqueeze(1)
        return embeds, mask

    def offload(self) -> None:
        """Move the encoder to host memory and release the GPU's cached blocks."""
        was = next(self.model.parameters()).device
        self.model.to("cpu")
        _free_cuda_cache(was)


def layer_pieces(model) -> list:
    """The pieces of a umT5 encoder that visit the device one at a time: the token embedding, each
    block, the final norm (everything with weights, in forward order)."""
    enc = getattr(model, "encoder", model)
    pieces = [enc.embed_tokens, *enc.block, enc.final_layer_norm]
    if sum(p.numel() for m in pieces for p in m.parameters()) != sum(p.numel() for p in model.parameters()):
        raise ValueError("the text encoder has weights outside its embedding, blocks and final norm: "
                         "sequential offload does not know where they run")
    return pieces


@contextlib.contextmanager
def _one_piece_at_a_time(model, device):
    """Each piece of :func:`layer_pieces` moved to ``device`` just before its forward and back to
    the host just after (PyTorch forward hooks, removed on exit): the device holds one piece's
    weights and the activations. The weights cross the bus once per call (10.6 GiB for umT5-XXL,
    about 0.4 s at 25 GB/s), small beside one DiT step."""
    device = torch.device(device)
    model.to("cpu")
    handles = []
    def arrive(module, args):  # a hook's return value would replace the inputs: return None
        module.to(device)

    def leave(module, args, out):  # ... or the output
        module.to("cpu")

    for piece in layer_pieces(model):
        handles.append(piece.register_forward_pre_hook(arrive))
        handles.append(piece.register_forward_hook(leave))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        model.to("cpu")
        _free_cuda_cache(device)


# -- VAE -----------------------------------------------------------------------------------------

class VideoVAE:
    """The Wan VAE with the pipelines' latent normalization. :meth:`encode` takes pixels
    [B, 3, F, H, W] in [-1, 1] (F = 4k + 1, H and W multiples of 8) and returns normalized
    float32 latents [B, z, k + 1, H / 8, W / 8]; :meth:`decode` inverts it.

    Memory: ``tiling`` (off by default, as officially) decodes and encodes in overlapping spatial
    tiles of ``tile`` pixels every ``tile_stride`` pixels, blended at the seams (diffusers' Wan
    VAE tiling; frames smaller than a tile are not tiled): less memory at 480p/720p, but it
    CHANGES PIXELS at the tile seams (the official pipeline never tiles). ``slicing`` (on) runs
    batch items one at a time (the same values). The Wan VAE already runs frame chunk by frame
    chunk in time (causal cache).

    Normalization is the official arithmetic: ``(z - mean) * (1 / std)`` and its inverse
    ``z / (1 / std) + mean`` (``latents_mean``/``latents_std`` of the VAE config)."""

    def __init__(self, vae, *, device=None, tiling: bool = False, slicing: bool = True,
                 tile: Tuple[int, int] = DEFAULT_TILE, tile_stride: Tuple[int, int] = DEFAULT_TILE_STRIDE):
        self.vae = vae.eval()
        for p in self.vae.parameters():
            p.requires_grad_(False)
        cfg = vae.config
        self.z_dim = int(cfg.z_dim)
        self.time_stride = int(getattr(cfg, "scale_factor_temporal", None) or 4)
        self.space_stride = int(getattr(cfg, "scale_factor_spatial", None) or 8)
        mean, std = list(cfg.latents_mean), list(cfg.latents_std)
        if len(mean) != self.z_dim or len(std) != self.z_dim:
            raise ValueError(f"VAE config: latents_mean/latents_std have {len(mean)}/{len(std)} entries, z_dim is "
                             f"{self.z_dim}")
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._inv_std = 1.0 / self._std  # the official pipeline's `latents_std` (1 / std)
        self.device = torch.device(device) if device is not None else next(vae.parameters()).device
        if next(vae.parameters()).device != self.device:  # (a no-op .to still swaps every tensor)
            self.vae.to(self.device)
        self.set_tiling(tiling, tile, tile_stride)
        self.set_slicing(slicing)

    @classmethod
    def from_pretrained(cls, root, *, dtype=None, device=None, **kwargs) -> "VideoVAE":
        """Load ``root/vae`` (diffusers ``AutoencoderKLWan``) in ``dtype`` onto ``device``."""
        root = check_components(root, vae=True)
        device, dtype = _resolve(device, dtype)
        diffusers = require("diffusers")
        vae = diffusers.AutoencoderKLWan.from_pretrained(str(root), subfolder=VAE_DIR, torch_dtype=dtype)
        return cls(vae, device=device, **kwargs)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def set_tiling(self, enabled: bool, tile: Tuple[int, int] = DEFAULT_TILE,
                   tile_stride: Tuple[int, int] = DEFAULT_TILE_STRIDE) -> None:
        th, tw = (int(v) for v in tile)
        sh, sw = (int(v) for v in tile_stride)
        if min(th, tw, sh, sw) <= 0 or th % self.space_stride or tw % self.space_stride \
                or sh % self.space_stride or sw % self.space_stride or sh > th or sw > tw:
            raise ValueError(f"VAE tile {tile} and stride {tile_stride} must be positive multiples of "
                             f"{self.space_stride} pixels with stride <= tile")
        self.tiling, self.tile, self.tile_stride = bool(enabled), (th, tw), (sh, sw)
        if enabled:
            self.vae.enable_tiling(tile_sample_min_height=th, tile_sample_min_width=tw,
                                   tile_sample_stride_height=sh, tile_sample_stride_width=sw)
        else:
            self.vae.disable_tiling()

    def set_slicing(self, enabled: bool) -> None:
        self.slicing = bool(enabled)
        (self.vae.enable_slicing if enabled else self.vae.disable_slicing)()

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z.float() - self._mean.to(z.device)) * self._inv_std.to(z.device)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.float() / self._inv_std.to(latents.device) + self._mean.to(latents.device)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, generator=None, sample: bool = False, repeat: int = 1) -> torch.Tensor:
        """Pixels [B, 3, F, H, W] in [-1, 1] -> normalized float32 latents on ``self.device``.

        ``sample=False`` (this method's default): the posterior's mean, deterministic.
        ``sample=True``: a posterior sample ``mean + std * eps`` as the official pipeline takes it
        (``retrieve_latents``): ``eps`` standard normal float32 drawn on the CPU (so a seed gives
        the same latents on every device), one batch item after the other, from ``generator`` (a
        CPU ``torch.Generator``, or a list of them, one per item) or, with ``generator=None``,
        from torch's global CPU generator (the official refinement's stage-1 draw). The
        pipelines sample by default (their ``vae_sample=True``). ``repeat``: each input item
        stands for that many consecutive output items (one encode, ``repeat`` samples: the
        official ``num_videos_per_prompt`` with one conditioning input)."""
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 5 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be a tensor [B, 3, F, H, W], got "
                             f"{tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__}")
        F, H, W = pixels.shape[2:]
        if (F - 1) % self.time_stride:
            raise ValueError(f"the VAE encodes 4k + 1 frames ({self.time_stride}k + 1), got {F}")
        if H % self.space_stride or W % self.space_stride:
            raise ValueError(f"frame size {H} x {W} must be a multiple of {self.space_stride} for the VAE")
        if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
            raise ValueError(f"repeat must be a positive int, got {repeat!r}")
        dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        mean, std = dist.mean, dist.std
        if repeat > 1:
            mean, std = mean.repeat_interleave(repeat, 0), std.repeat_interleave(repeat, 0)
        if not sample:
            return self.normalize(mean)
        n = mean.shape[0]
        gens = list(generator) if isinstance(generator, (list, tuple)) else [generator] * n
        if len(gens) != n:
            raise ValueError(f"{len(gens)} generators for a batch of {n}")
        for g in gens:
            if g is not None and g.device.type != "cpu":
                raise ValueError("the posterior is sampled on the CPU: pass a CPU torch.Generator")
        shape = (1,) + tuple(mean.shape[1:])
        eps = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens])
        z = mean + std * eps.to(mean.device, mean.dtype)
        return self.normalize(z)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents [B, z, T, h, w] -> float32 pixels [B, 3, 4(T-1)+1, 8h, 8w] in [-1, 1]
        (clamped), on ``self.device``."""
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5 or latents.shape[1] != self.z_dim:
            raise ValueError(f"latents must be a tensor [B, {self.z_dim}, T, H, W], got "
                             f"{tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__}")
        z = self.denormalize(latents.to(self.device)).to(self.dtype)
        return self.vae.decode(z).sample.float().clamp_(-1, 1)

    def to(self, device) -> "VideoVAE":
        was = self.device
        self.device = torch.device(device)
        self.vae.to(self.device)
        if was != self.device:
            _free_cuda_cache(was)
        return self

    def offload(self) -> None:
        self.to("cpu")


# -- scheduler -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SchedulerConfig:
    """The settings of the checkpoint's ``scheduler/scheduler_config.json`` (the official
    ``FlowMatchEulerDiscreteScheduler``) that the pipelines' schedules use: ``shift`` (12 in the
    official checkpoint) and ``num_train_timesteps`` (1000). Settings that would make the
    official scheduler compute other sigmas (dynamic shifting, Karras/exponential/beta sigmas,
    ``shift_terminal``, ``invert_sigmas``, stochastic sampling) are errors here, not ignored."""

    shift: float = 12.0
    num_train_timesteps: int = 1000

    _UNSUPPORTED = ("use_dynamic_shifting", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                    "shift_terminal", "invert_sigmas", "stochastic_sampling")

    @classmethod
    def from_dict(cls, cfg: dict, where: str = "scheduler config") -> "SchedulerConfig":
        for key in cls._UNSUPPORTED:
            if cfg.get(key):
                raise NotImplementedError(f"{where}: {key}={cfg[key]!r} is not supported (the pipelines implement "
                                          "the official static shift only)")
        shift = cfg.get("shift", 1.0)
        steps = cfg.get("num_train_timesteps", 1000)
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
            raise ValueError(f"{where}: shift must be a positive number, got {shift!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"{where}: num_train_timesteps must be a positive int, got {steps!r}")
        return cls(shift=float(shift), num_train_timesteps=int(steps))

    @classmethod
    def from_pretrained(cls, root) -> Optional["SchedulerConfig"]:
        """``root/scheduler/scheduler_config.json``, or None when the checkpoint has no such file."""
        path = checkpoint_root(root) / SCHEDULER_DIR / "scheduler_config.json"
        if not path.is_file():
            return None
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{str(path)!r} is not valid JSON ({e})") from None
        return cls.from_dict(cfg, str(path))

    def sampling_kwargs(self) -> dict:
        return {"shift": self.shift, "num_train_timesteps": self.num_train_timesteps}

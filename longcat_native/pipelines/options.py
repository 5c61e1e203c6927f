"""What every tensor-level task shares: the model facts it reads (patch, channels, device, the
latent size), the noise, the LoRA/BSA scope of a call (:class:`LoRAAndBSAEnabled`), and
:class:`SamplingOptions` with the keyword checks (official aliases, unknown keywords as Python's
TypeError). The tasks themselves are in :mod:`.tasks`."""

from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Tuple

import torch

from .media import PIPELINES_EXTRA
from .sampler import DEFAULT_SHIFT, NUM_TRAIN_TIMESTEPS, denoise, get_schedule
from .shapes import latent_size

__all__ = ["USE_PIPELINE_HINT", "SamplingOptions", "LoRAAndBSAEnabled", "check_task_keywords", "official_aliases",
           "call_generator", "sampling_keywords", "reject_unknown",
           "find_lora_file", "make_noise", "model_patch", "model_channels", "model_device", "resolve_latent_size"]


def model_patch(dit) -> Tuple[int, int, int]:
    cfg = getattr(dit, "config", None)
    return tuple(getattr(cfg, "patch_size", (1, 2, 2)))


def model_channels(dit) -> int:
    cfg = getattr(dit, "config", None)
    return int(getattr(cfg, "in_channels", 16))


def resolve_latent_size(dit, latent, num_frames, height, width) -> Tuple[int, int, int]:
    if latent is not None:
        if len(latent) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in latent):
            raise ValueError(f"latent_size must be three positive ints (T, H, W), got {latent!r}")
        T, H, W = latent
        _, ph, pw = model_patch(dit)
        if H % ph or W % pw:
            raise ValueError(f"latent H x W = {H} x {W} must be divisible by the patch size {ph} x {pw}")
        return T, H, W
    return latent_size(num_frames, height, width, model_patch(dit))


USE_PIPELINE_HINT = ("LongCatVideoPipeline.from_pretrained(checkpoint_root) loads the umT5 text encoder and the Wan VAE "
                 f"and takes prompt strings, pixels and decoded output (`{PIPELINES_EXTRA}`)")


def _check_output_type(output_type: str) -> None:
    if output_type != "latent":
        raise ValueError(
            f"output_type={output_type!r}: the pipeline functions return latents (output_type='latent'); decoding "
            f"needs the Wan VAE: {USE_PIPELINE_HINT}"
        )


def make_noise(shape, seed: Optional[int] = 0, generator: Optional[torch.Generator] = None,
               device=None) -> torch.Tensor:
    """float32 standard normal noise drawn on the CPU (device-independent), moved to ``device``."""
    if generator is None:
        generator = torch.Generator(device="cpu").manual_seed(0 if seed is None else int(seed))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device)


def call_generator(seed, generator) -> torch.Generator:
    """The generator a call draws from: its CPU ``generator``, or a new one seeded with ``seed``."""
    if generator is not None:
        if generator.device.type != "cpu":
            raise ValueError("generator must be a CPU torch.Generator (noise is drawn on the CPU, then moved)")
        return generator
    return torch.Generator(device="cpu").manual_seed(0 if seed is None else int(seed))


def model_device(dit):
    return getattr(dit, "device", torch.device("cpu"))


# FastVideo's Diffusers repos keep each official LoRA in a folder of its own (their converter,
# scripts/checkpoint_conversion/longcat_to_fastvideo.py: lora/distilled/, lora/refinement/).
FASTVIDEO_LORA_FOLDERS = {"cfg_step_lora": "distilled", "refinement_lora": "refinement"}


def find_lora_file(dit, key: str) -> Optional[Path]:
    """The LoRA file of ``key`` beside the model's checkpoint: ``lora/<key>.safetensors`` (the
    official root), else FastVideo's ``lora/<folder>/<key>.safetensors`` or the one
    ``.safetensors`` file in that folder (the Diffusers root); looked for in the checkpoint
    folder and its parent."""
    ckpt = getattr(dit, "checkpoint_path", None)
    if not ckpt:
        return None
    for root in (Path(ckpt), Path(ckpt).parent):
        f = root / "lora" / f"{key}.safetensors"
        if f.is_file():
            return f
        folder = root / "lora" / FASTVIDEO_LORA_FOLDERS.get(key, key)
        if folder.is_dir():
            f = folder / f"{key}.safetensors"
            if f.is_file():
                return f
            files = sorted(folder.glob("*.safetensors"))
            if len(files) == 1:
                return files[0]
    return None


class LoRAAndBSAEnabled:
    """``with LoRAAndBSAEnabled(dit, lora="refinement_lora", bsa=True): ...``: the LoRA (loaded
    first if need be) and/or BSA are on for the ``with`` block only, through the model's own
    ``load_lora``/``enable_loras``/``enable_bsa``, and on exit put back as they were before
    the block: the LoRAs that were active (``active_loras``) enabled again, BSA on again if it
    was on (so a model switched on the official way, ``dit.enable_loras([...])`` /
    ``dit.enable_bsa()`` once before a demo's loop of calls, stays so through calls that also
    name them); a model that does not say (no ``active_loras`` / ``cfg.enable_bsa``) is switched
    off (``disable_all_loras``/``disable_bsa``). The constructor checks everything (missing LoRA
    file, a model without those methods) before any work."""

    def __init__(self, dit, lora: Optional[str], lora_path=None, bsa: bool = False, lora_kwargs=None):
        self.dit, self.lora, self.lora_path, self.bsa = dit, lora, lora_path, bool(bsa)
        self.lora_kwargs = dict(lora_kwargs or {})
        self.check()

    def check(self) -> None:
        dit = self.dit
        if self.lora:
            if not hasattr(dit, "enable_loras"):
                raise NotImplementedError(f"lora={self.lora!r}: this model has no enable_loras()")
            if self.lora not in (getattr(dit, "lora_dict", None) or {}):
                path = self.lora_path or find_lora_file(dit, self.lora)
                if path is None:
                    raise ValueError(f"lora={self.lora!r} is not loaded and no lora/{self.lora}.safetensors (or a "
                                     "Diffusers root's lora/<name>/ folder) was found next to the checkpoint; pass "
                                     "lora_path= or load it with dit.load_lora()")
                if not os.path.isfile(path):
                    raise ValueError(f"lora_path {path} is not a file")
                if not hasattr(dit, "load_lora"):
                    raise NotImplementedError(f"lora={self.lora!r}: this model has no load_lora()")
                self.lora_path = path
        if self.bsa and not hasattr(dit, "enable_bsa"):
            raise NotImplementedError("enable_bsa=True: this model has no enable_bsa()")

    def __enter__(self):
        dit = self.dit
        prev = getattr(dit, "active_loras", None)
        self._prev_loras = list(prev) if isinstance(prev, (list, tuple)) else None
        self._prev_bsa = getattr(getattr(dit, "cfg", None), "enable_bsa", None)
        if self.lora:
            if self.lora not in (getattr(dit, "lora_dict", None) or {}):
                dit.load_lora(str(self.lora_path), self.lora, **self.lora_kwargs)
            dit.enable_loras([self.lora])
        if self.bsa:
            dit.enable_bsa()
        return self

    def __exit__(self, *exc):
        dit = self.dit
        if self.bsa and self._prev_bsa is not True and hasattr(dit, "disable_bsa"):
            dit.disable_bsa()
        if self.lora:
            if self._prev_loras:
                dit.enable_loras(self._prev_loras)
            elif hasattr(dit, "disable_all_loras"):
                dit.disable_all_loras()
        return False


@dataclass(frozen=True)
class SamplingOptions:
    """The keyword arguments every ``generate_*`` function takes besides its own (refinement takes
    all but ``guidance_scale`` and ``distill``: it runs without guidance on the base schedule).

    ``num_steps`` (official name ``num_inference_steps``, accepted too), ``guidance_scale``
    (CFG-zero; <= 1: none, and a negative prompt is then ignored), ``distill`` (official
    ``use_distill``: the distilled schedule), ``shift`` and ``num_train_timesteps`` (the
    checkpoint's ``scheduler/scheduler_config.json``; :class:`LongCatVideoPipeline` reads them):
    the schedule (:func:`~.sampler.get_schedule`). ``seed`` or a CPU ``generator``: the noise,
    drawn first, as officially. ``num_videos_per_prompt`` (official): each prompt's embeddings
    (and conditioning latents of batch B) are repeated that many times, consecutively. ``lora``
    (a key: loaded from the checkpoint's ``lora/`` folder, or ``lora_path``, with ``lora_kwargs``
    for ``load_lora``) is on for the call only. ``output_type`` must be "latent" here (decoding:
    :class:`LongCatVideoPipeline`). ``progress`` prints a line per step; ``callback(i, t,
    latents)`` is called after each. ``cache``: a :class:`~longcat_native.runtime.step_cache.StepCache`
    (step caching, docs/design/step_cache.md), used by every denoising call of the task; its
    ``report()`` lists each call's run."""

    num_steps: int = 50
    guidance_scale: float = 4.0
    distill: bool = False
    shift: float = DEFAULT_SHIFT
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
    seed: Optional[int] = 0
    generator: Optional[torch.Generator] = None
    num_videos_per_prompt: int = 1
    lora: Optional[str] = None
    lora_path: Optional[str] = None
    lora_kwargs: Optional[dict] = None
    output_type: str = "latent"
    progress: bool = True
    callback: Optional[Callable] = None
    cache: Optional[Any] = None  # a StepCache (runtime/step_cache.py): step caching; its report: cache.report()

    @classmethod
    def take(cls, fn: str, kwargs: dict) -> "SamplingOptions":
        """``kwargs`` of the task function named ``fn`` -> the options; an argument it does not
        take is a TypeError naming it, as Python's own; ``output_type`` is checked. The official
        spellings ``num_inference_steps`` and ``use_distill`` are accepted for ``num_steps`` and
        ``distill``."""
        kwargs = official_aliases(kwargs)
        reject_unknown(fn, kwargs, sampling_keywords(fn))
        opts = cls(**kwargs)
        _check_output_type(opts.output_type)
        n = opts.num_videos_per_prompt
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_videos_per_prompt must be a positive int, got {n!r}")
        return opts

    def as_kwargs(self, **changes) -> dict:
        """The options as keyword arguments for another task function (with ``changes``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} | changes

    def rng(self) -> torch.Generator:
        return call_generator(self.seed, self.generator)

    def lora_and_bsa(self, dit, bsa: bool = False) -> "LoRAAndBSAEnabled":
        return LoRAAndBSAEnabled(dit, self.lora, self.lora_path, bsa, self.lora_kwargs)

    def schedule(self, t_thresh: Optional[float] = None, enhance_hf: bool = False, distill: Optional[bool] = None):
        return get_schedule(self.num_steps, distill=self.distill if distill is None else distill, shift=self.shift,
                            t_thresh=t_thresh, enhance_hf=enhance_hf, num_train_timesteps=self.num_train_timesteps)

    def sample(self, dit, shape, text, noise: Optional[torch.Tensor] = None, *, t_thresh: Optional[float] = None,
               enhance_hf: bool = False, **denoise_kwargs) -> torch.Tensor:
        """Noise of ``shape`` (unless given) denoised with ``text`` = (prompt_embeds, prompt_mask,
        negative_embeds, negative_mask), the LoRA on; ``denoise_kwargs`` go to :func:`denoise`."""
        extras = self.lora_and_bsa(dit)  # checked before the noise is drawn
        schedule = self.schedule(t_thresh, enhance_hf)
        if noise is None:
            noise = make_noise(shape, generator=self.rng(), device=model_device(dit))
        with extras:
            return denoise(dit, noise, *text, guidance_scale=self.guidance_scale, schedule=schedule,
                           progress=self.progress, callback=self.callback, cache=self.cache, **denoise_kwargs)


_NOT_SHARED = {"generate_refine": ("guidance_scale", "distill")}


_ALIASES = {"num_inference_steps": "num_steps", "use_distill": "distill"}  # official -> ours


def official_aliases(kwargs: dict) -> dict:
    """``kwargs`` with the official spellings (``num_inference_steps``, ``use_distill``) renamed
    to ours; both spellings with different values are an error."""
    out = dict(kwargs)
    for official, ours in _ALIASES.items():
        if official in out:
            value = out.pop(official)
            if ours in out and out[ours] != value:
                raise ValueError(f"{ours}={out[ours]!r} and {official}={value!r} disagree; pass one of them")
            out[ours] = value
    return out


def sampling_keywords(fn: str) -> set:
    return {f.name for f in dataclasses.fields(SamplingOptions)} - set(_NOT_SHARED.get(fn, ()))


def reject_unknown(fn: str, kwargs: dict, allowed: set) -> None:
    for name in kwargs:
        if name not in allowed:
            raise TypeError(f"{fn}() got an unexpected keyword argument {name!r}")


def check_task_keywords(fn: Callable, kwargs: dict) -> None:
    """The TypeError ``fn(..., **kwargs)`` would raise for an argument it does not take, raised
    now (a pipeline checks its pass-through arguments before encoding anything)."""
    own = {p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    reject_unknown(fn.__name__, official_aliases(kwargs), own | sampling_keywords(fn.__name__))

"""The official LongCat-Video flow-matching schedules, bit for bit in float32 as the official
pipeline's scheduler (shift 12, no dynamic shifting): base and distilled sigmas, the static shift,
``t_thresh`` truncation (refinement) and the ``enhance_hf`` tail (video continuation), and
:func:`get_schedule`, the one entry. :func:`~.sampler.denoise` runs them (re-exported there).

Design notes: docs/design/sampler.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["NUM_TRAIN_TIMESTEPS", "NUM_DISTILL_STEPS", "DEFAULT_SHIFT", "ENHANCE_HF_START", "ENHANCE_HF_STEPS",
           "Schedule", "base_sigmas", "distill_sigmas", "shift_sigmas", "flow_schedule", "truncate_schedule",
           "enhance_hf_schedule", "get_schedule"]

NUM_TRAIN_TIMESTEPS = 1000   # scheduler config num_train_timesteps
NUM_DISTILL_STEPS = 50       # the distilled (cfg_step LoRA) model was trained on a 50-point grid
DEFAULT_SHIFT = 12.0         # scheduler config shift (use_dynamic_shifting: false)
ENHANCE_HF_START = 500       # video continuation: tail of uniform timesteps from here towards 0
ENHANCE_HF_STEPS = 10


@dataclass(frozen=True)
class Schedule:
    """``timesteps`` [n] float32 (what the DiT is given) and ``sigmas`` [n + 1] float32 (what the
    Euler step uses; the last is 0). Both on the CPU; :func:`denoise` moves them once."""

    timesteps: torch.Tensor
    sigmas: torch.Tensor

    def __post_init__(self):
        if self.timesteps.dim() != 1 or self.sigmas.shape != (self.timesteps.shape[0] + 1,):
            raise ValueError(f"a schedule needs timesteps [n] and sigmas [n + 1], got "
                             f"{tuple(self.timesteps.shape)} and {tuple(self.sigmas.shape)}")

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])


def _check_steps(num_steps) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    return num_steps


def base_sigmas(num_steps: int) -> torch.Tensor:
    """Unshifted sigmas of the base model: ``linspace(1, 0.001, num_steps)`` in float32."""
    return torch.linspace(1.0, 0.001, _check_steps(num_steps), dtype=torch.float32)


def distill_sigmas(num_steps: int = 16) -> torch.Tensor:
    """Unshifted sigmas of the distilled (cfg_step LoRA) model: the grid 20/1000 ... 1000/1000
    walked from high to low noise, subsampled at ``floor(linspace(0, 50, num_steps, endpoint=False))``."""
    num_steps = _check_steps(num_steps)
    if num_steps > NUM_DISTILL_STEPS:
        raise ValueError(f"the distilled schedule has at most {NUM_DISTILL_STEPS} steps, got {num_steps}")
    stride = NUM_TRAIN_TIMESTEPS // NUM_DISTILL_STEPS
    grid = (torch.arange(1, NUM_DISTILL_STEPS + 1, dtype=torch.float32) * stride).round().long()
    # floor(i * 50 / n) for i < n: numpy's linspace(0, 50, n, endpoint=False) then floor. Exact in
    # float64 for these small integers, so plain Python arithmetic gives the same indices.
    idx = torch.tensor([math.floor(i * (NUM_DISTILL_STEPS / num_steps)) for i in range(num_steps)], dtype=torch.long)
    return (torch.flip(grid, [0])[idx].float() / NUM_TRAIN_TIMESTEPS).to(torch.float32)


def shift_sigmas(sigmas: torch.Tensor, shift: float = DEFAULT_SHIFT) -> torch.Tensor:
    """The scheduler's static shift, in float32: ``shift * s / (1 + (shift - 1) * s)``."""
    shift = float(shift)
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    s = sigmas.to(torch.float32)
    return shift * s / (1 + (shift - 1) * s)


def flow_schedule(num_steps: int = 50, distill: bool = False, shift: float = DEFAULT_SHIFT,
                  num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Schedule:
    """The official ``scheduler.set_timesteps(n, sigmas=pipeline.get_timesteps_sigmas(n, distill))``
    (``shift`` and ``num_train_timesteps``: the scheduler config's; timesteps = sigmas * the latter)."""
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
    sig = distill_sigmas(num_steps) if distill else base_sigmas(num_steps)
    sig = shift_sigmas(sig, shift)
    timesteps = sig * num_train_timesteps
    return Schedule(timesteps, torch.cat([sig, torch.zeros(1, dtype=torch.float32)]))


def _from_timesteps(timesteps: torch.Tensor) -> Schedule:
    # The official pipeline overwrites scheduler.timesteps and sets sigmas = timesteps / 1000 + [0].
    timesteps = timesteps.to(torch.float32)
    return Schedule(timesteps, torch.cat([timesteps / NUM_TRAIN_TIMESTEPS, torch.zeros(1, dtype=torch.float32)]))


def truncate_schedule(schedule: Schedule, t_thresh: float = 0.5) -> Schedule:
    """Refinement: start at ``t_thresh * 1000`` and continue with the schedule's timesteps below it
    (50 steps, shift 12, t_thresh 0.5: 500, 443.0, 343.5, 207.8, 11.9)."""
    t_thresh = float(t_thresh)
    if not 0 < t_thresh <= 1:
        raise ValueError(f"t_thresh must be in (0, 1], got {t_thresh}")
    thresh = torch.tensor(t_thresh * NUM_TRAIN_TIMESTEPS, dtype=torch.float32)
    ts = schedule.timesteps
    return _from_timesteps(torch.cat([thresh[None], ts[ts < thresh]]))


def enhance_hf_schedule(schedule: Schedule, start: float = ENHANCE_HF_START,
                        num_tail_steps: int = ENHANCE_HF_STEPS) -> Schedule:
    """Video continuation's ``enhance_hf``: keep the timesteps above ``start`` and replace the rest
    by ``num_tail_steps`` uniform timesteps from ``start`` towards 0 (0 excluded)."""
    ts = schedule.timesteps
    # np.linspace(500, 0, 10, endpoint=False, dtype=float32): 500 - 50 i, exact.
    tail = torch.tensor([start - start * i / num_tail_steps for i in range(num_tail_steps)], dtype=torch.float32)
    return _from_timesteps(torch.cat([ts[ts > start], tail]))


def get_schedule(num_steps: int = 50, distill: bool = False, shift: float = DEFAULT_SHIFT,
                 t_thresh: Optional[float] = None, enhance_hf: bool = False,
                 num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Schedule:
    """One place for every official schedule. ``t_thresh`` (refinement) truncates the base
    schedule; ``enhance_hf`` (video continuation) replaces its tail. They exclude each other and
    ``distill`` (the official pipeline asserts ``not (use_distill and enhance_hf)``). ``shift``
    and ``num_train_timesteps`` are the scheduler config's (:func:`flow_schedule`)."""
    if enhance_hf and distill:
        raise ValueError("enhance_hf and distill cannot both be set (the official pipeline forbids it)")
    if t_thresh is not None and (distill or enhance_hf):
        raise ValueError("t_thresh (refinement) runs the base schedule; do not combine it with distill or enhance_hf")
    sched = flow_schedule(num_steps, distill=distill, shift=shift, num_train_timesteps=num_train_timesteps)
    if t_thresh is not None:
        sched = truncate_schedule(sched, t_thresh)
    if enhance_hf:
        sched = enhance_hf_schedule(sched)
    return sched

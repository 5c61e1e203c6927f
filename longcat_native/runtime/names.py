"""The names a user picks from (kernel paths, attention backends, dtypes) and the official spellings
of arguments, with no torch import: the command line offers them without paying for torch at start-up."""

from ..kernels import KERNEL_PATHS

__all__ = ["KERNEL_PATHS", "KERNEL_CHOICES", "ATTENTION_BACKENDS", "ATTENTION_CHOICES", "DTYPE_CHOICES", "MAX_STEPS", "merge_alias"]

KERNEL_CHOICES = KERNEL_PATHS + ("auto",)  # "auto": the fused path on CUDA, the reference elsewhere
ATTENTION_BACKENDS = ("flash3", "flash2", "cudnn", "sdpa", "reference")
ATTENTION_CHOICES = ("auto",) + ATTENTION_BACKENDS
DTYPE_CHOICES = ("float32", "bfloat16", "float16")  # also accepted: fp32, bf16, fp16, half, float
MAX_STEPS = 1000  # denoising steps: the model was trained on 1000 timesteps; more is a mistake


def merge_alias(ours, theirs, our_name: str, their_name: str):
    """Accept the official (diffusers) spelling of an argument as an alias of ours: the one given,
    or an error when both are given and disagree."""
    if theirs is None:
        return ours
    if ours is not None and ours != theirs:
        raise ValueError(f"{our_name}={ours!r} and {their_name}={theirs!r} disagree; pass one of them")
    return theirs

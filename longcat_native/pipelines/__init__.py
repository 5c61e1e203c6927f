"""The generation layer, on top of :mod:`longcat_native.runtime` (which never imports it):

- :mod:`.shapes`: VAE strides, the official aspect-ratio buckets, frames <-> latents, refinement padding;
- :mod:`.sampler`: ``denoise`` (flow-matching Euler with CFG-zero) and the schedules;
- :mod:`.tasks`: the tasks on tensors (umT5 embeddings, VAE latents) and ``SamplingOptions``;
- :mod:`.components`, :mod:`.media`: the umT5 text encoder, the Wan VAE, image/video files;
- :mod:`.pipeline`: ``LongCatVideoPipeline``, prompt strings and pixels in, decoded video out;
- :mod:`.plan`: the ``longcat-native generate`` request (its flags) and its plan, every check before loading;
- :mod:`.run`: the run of a plan: load, encode, denoise, decode, write, each stage measured.

Names load on first use (PEP 562): importing this package, or :mod:`.shapes`, imports no torch.
"""

import importlib

# public name -> submodule
_EXPORTS = {
    "PIPELINES_EXTRA": "media",
    "OUTPUT_TYPES": "pipeline", "CHAINS": "pipeline", "LongCatVideoPipeline": "pipeline", "encode_prompts": "pipeline",
    "SchedulerConfig": "components",
    "denoise": "sampler",
    "RESOLUTIONS": "shapes", "VAE_SPACE_STRIDE": "shapes", "VAE_TIME_STRIDE": "shapes", "frames_to_latents": "shapes",
    "latent_size": "shapes", "pixel_size": "shapes", "refine_frame_padding": "shapes", "BUCKET_TABLES": "shapes",
    "get_bucket_config": "shapes", "closest_bucket": "shapes", "bucket_size": "shapes",
    "OFFICIAL_DEMO_NEGATIVE_PROMPT": "tasks", "TASKS": "tasks", "SamplingOptions": "options", "generate": "tasks",
    "generate_t2v": "tasks", "generate_i2v": "tasks", "generate_vc": "tasks", "generate_long": "tasks",
    "generate_refine": "tasks", "make_noise": "options", "upsample_latents": "tasks", "REFINE_RNGS": "tasks",
    "GenerateRequest": "plan", "plan_generate": "plan", "run_generate": "run", "refine_memory_estimate": "plan",
}
_SUBMODULES = ("components", "media", "options", "pipeline", "plan", "run", "sampler", "shapes", "tasks")

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))

"""The generation layer: the denoising loop, the tensor-level tasks and ``LongCatVideoPipeline``.

- :mod:`.shapes`: VAE strides, resolution buckets, frames <-> latents, refinement padding;
- :mod:`.sampler`: ``denoise`` (flow-matching Euler with CFG-zero) and the schedules;
- :mod:`.tasks`: text-to-video, image-to-video, video continuation, long video and refinement on
  tensors (umT5 embeddings and VAE latents);
- :mod:`.components`, :mod:`.media`: the umT5 text encoder, the Wan VAE, image/video files;
- :mod:`.pipeline`: ``LongCatVideoPipeline``, prompt strings and pixels in, decoded video out.

It is built on :mod:`longcat_native.runtime` (the model) and nothing here is imported by it.
"""

from .media import PIPELINES_EXTRA
from .pipeline import OUTPUT_TYPES, LongCatVideoPipeline, encode_prompts
from .sampler import denoise
from .shapes import (RESOLUTIONS, VAE_SPACE_STRIDE, VAE_TIME_STRIDE, frames_to_latents, latent_size, pixel_size,
                     refine_frame_padding)
from .tasks import (OFFICIAL_DEMO_NEGATIVE_PROMPT, TASKS, generate, generate_i2v, generate_long, generate_refine,
                    generate_t2v, generate_vc, make_noise, upsample_latents)

__all__ = [
    "TASKS", "PIPELINES_EXTRA", "VAE_TIME_STRIDE", "VAE_SPACE_STRIDE", "RESOLUTIONS", "OUTPUT_TYPES",
    "OFFICIAL_DEMO_NEGATIVE_PROMPT", "latent_size", "frames_to_latents", "make_noise", "generate", "generate_t2v",
    "generate_i2v", "generate_vc", "generate_long", "generate_refine", "upsample_latents", "encode_prompts",
    "refine_frame_padding", "pixel_size", "LongCatVideoPipeline", "denoise",
]

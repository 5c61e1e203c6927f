"""The runtime half: config, weights, the model, attention dispatch, LoRA, the sampler and
pipelines, compile/CUDA graphs, context parallelism, profiling and the memory tracer."""

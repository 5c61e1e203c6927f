"""The runtime half: config, weights, the model, attention dispatch (and, in later versions,
LoRA, sampler, compile/graphs, parallelism, profiling)."""

"""The SimPy simulator: the engine, its servers and recorders, the fused loops, cache-only replay."""

"""Torch executor: MoE model, codecs, on-disk expert store, I/O and decompression workers."""

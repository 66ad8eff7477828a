"""Numerical kernels of the hybrid model, each beside its naive reference.

Every op here is pure PyTorch and runs on CPU. The chunked forms are the
reference paths the model uses when no CUDA kernel applies; the `*_naive`
functions are the plain sequential definitions the tests compare against.
"""

"""Numerical kernels of the hybrid model, each beside its naive reference.

The chunked forms are pure PyTorch and run on CPU: the reference paths the
model uses when no kernel applies; the `*_naive` functions are the plain
sequential definitions the tests compare against. Beside them, each module
holds the calls of its op's kernels (`*_kernel`, `flash_attention`,
`flex_attention`: fla-core, causal-conv1d, flash-attn, FlexAttention, imported
on first use) on the same contract, and `triton_selective_scan.py` is Braid's
own Triton kernel (Mamba-1 with document resets).
"""

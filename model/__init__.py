"""Braid's hybrid model: pattern-built Mamba / GLA / attention / RG-LRU / MLP sublayers.

The single-device model imports only torch, so the Hugging Face export ships these
same files as its remote code.
"""
from .cache import HybridCache, KVCache, RecurrentState
from .config import (PRESETS, AttentionConfig, ConfigError, GLAConfig, MambaConfig, ModelConfig, RGLRUConfig,
                     get_preset, parse_pattern, pattern_stages, transformer_twin)
from .generation import generate
from .hybrid import HybridLM
from .kernels import KernelUnavailable

__all__ = ["AttentionConfig", "ConfigError", "GLAConfig", "HybridCache", "HybridLM", "KVCache", "KernelUnavailable",
           "MambaConfig", "ModelConfig", "PRESETS", "RGLRUConfig", "RecurrentState", "generate", "get_preset",
           "parse_pattern", "pattern_stages", "transformer_twin"]

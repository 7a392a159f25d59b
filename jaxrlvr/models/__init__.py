"""Model definitions and Hugging Face checkpoint I/O."""

from jaxrlvr.models.checkpoint import load_hf_checkpoint, save_hf_checkpoint
from jaxrlvr.models.qwen2 import (
    CACHE_AXES,
    PRESETS,
    KVCache,
    Qwen2,
    Qwen2Config,
    init_cache,
    preset,
    with_compute_dtype,
)

__all__ = [
    "CACHE_AXES",
    "PRESETS",
    "KVCache",
    "Qwen2",
    "Qwen2Config",
    "init_cache",
    "load_hf_checkpoint",
    "preset",
    "save_hf_checkpoint",
    "with_compute_dtype",
]

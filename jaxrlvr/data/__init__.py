"""Data: sources (JSONL/Parquet rows), the files a config names (`files`), prompt templates,
the Grain batch pipeline, and the embedded arithmetic demo task.

Names are imported lazily so that light users (the demo reward) do not import Grain or
transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataError": "sources",
    "Example": "sources",
    "expand_paths": "sources",
    "read_examples": "sources",
    "DataSpec": "files",
    "parse_specs": "files",
    "read_prompts": "files",
    "max_token_bytes": "token_bound",
    "TEMPLATES": "templates",
    "QWEN_MATH_SYSTEM": "templates",
    "DAPO_PREFIX": "templates",
    "DAPO_SUFFIX": "templates",
    "chatml": "templates",
    "render_prompt": "templates",
    "PromptSet": "pipeline",
    "PromptBatch": "pipeline",
    "PromptDataset": "pipeline",
    "PromptBatchIterator": "pipeline",
    "prepare_prompts": "pipeline",
    "load_prompts": "pipeline",
    "ArithmeticProblem": "arithmetic",
    "generate_problems": "arithmetic",
    "write_solution": "arithmetic",
    "check_answer": "arithmetic",
    "write_demo_dataset": "arithmetic",
    "build_demo_tokenizer": "arithmetic",
    "save_demo_tokenizer": "arithmetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"jaxrlvr.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'jaxrlvr.data' has no attribute {name!r}")

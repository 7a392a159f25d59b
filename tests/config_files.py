"""Load the experiment files of `configs/` in tests, as `ml_collections.config_flags` does."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p.name for p in (ROOT / "configs").glob("*.py"))


def load(name: str):
    """The module of `configs/<name>`, imported from its path like `config_flags` does."""
    path = ROOT / "configs" / name
    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(name: str, arg: str | None = None):
    """`--config=configs/<name>[:arg]`."""
    module = load(name)
    return module.get_config() if arg is None else module.get_config(arg)

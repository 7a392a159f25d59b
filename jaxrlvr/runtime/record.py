"""The config record of a workdir: `config.json` and `config-history.jsonl`.

`config.json` holds the config the run started with and is never rewritten by a resume;
every resume whose config differs from the one in force appends a line to
`config-history.jsonl` with the step it resumed at, the changed keys (old and new
values) and the full new config. Together they say what every step ran with.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import ml_collections

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
HISTORY_FILE = "config-history.jsonl"


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_in_force(workdir: str) -> dict | None:
    """The config the workdir's latest run (start or resume) used, or None."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        config = json.load(f)
    history = os.path.join(workdir, HISTORY_FILE)
    if os.path.exists(history):
        with open(history) as f:
            for line in f:
                if line.strip():
                    config = json.loads(line)["config"]
    return config


def config_changes(before: dict, current: dict) -> dict[str, list]:
    """The flattened keys whose values differ between two configs: `{key: [old, new]}`."""
    old, new = flatten(before), flatten(current)
    return {
        k: [old.get(k), new.get(k)]
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k)
    }


def record_config(config: ml_collections.ConfigDict, workdir: str, *, start_step: int) -> None:
    """Record the config of a run starting (`start_step` 0) or resuming at `start_step`."""
    current = json.loads(config.to_json())
    before = config_in_force(workdir) if start_step > 0 else None
    if before is None:  # a fresh start: this config is the run's first
        write_atomic(os.path.join(workdir, CONFIG_FILE), json.dumps(current, indent=2))
        if os.path.exists(history := os.path.join(workdir, HISTORY_FILE)):
            os.remove(history)
        return
    changed = config_changes(before, current)
    if not changed:
        return
    for key, (was, now) in changed.items():
        log.warning("resuming at step %d with config.%s = %r (was %r)", start_step, key, now, was)
    entry = {"step": start_step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changed": changed}
    with open(os.path.join(workdir, HISTORY_FILE), "a") as f:
        f.write(json.dumps(entry | {"config": current}) + "\n")


def write_atomic(path: str, text: str) -> None:
    """Write `text` to `path` whole or not at all: a reader never sees half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)

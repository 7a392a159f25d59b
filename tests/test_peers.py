"""`benchmarks/peers.py` runs this project's side end to end at a tiny shape (no Tunix)."""

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "peers.py"


def load_peers():
    spec = importlib.util.spec_from_file_location("peers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["peers"] = module  # dataclasses resolve the module by name
    spec.loader.exec_module(module)
    return module


def test_jaxrlvr_side_runs(tmp_path):
    peers = load_peers()
    out = tmp_path / "peers.json"
    tiny = "--hidden 64 --heads 4 --kv-heads 2 --intermediate 128 --vocab 256 --prompts 4"
    tiny += " --group 2 --prompt-len 8 --max-new 8 --min-new 2 --seq-len 16 --min-response 2"
    peers.main(
        tiny.split()
        + ["--systems", "jaxrlvr", "--measurements", "sample-longtail,grpo-longtail"]
        + ["--repeats", "1", "--iters", "1", "--python", sys.executable, "--out", str(out)]
    )
    result = json.loads(out.read_text())
    records = {r["measurement"]: r for r in result["records"]}
    assert set(records) == {"sample-longtail", "grpo-longtail"}
    lens = peers.lengths(peers.Spec(**result["spec"]), "sample-longtail")
    assert records["sample-longtail"]["tokens"] == sum(lens) and min(lens) >= 2 and max(lens) <= 8
    for r in records.values():
        assert r["steady_s"] > 0 and r["first_s"] >= r["steady_s"] and r["peak_rss_mib"] > 0
    metrics = {(row["measurement"], row["metric"].strip()) for row in result["summary"]}
    assert ("sample-longtail", "throughput") in metrics and (
        "grpo-longtail",
        "step time",
    ) in metrics

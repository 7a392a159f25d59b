"""`logging.backends`: TensorBoard, W&B (offline), MLflow (a local file store) and Trackio
(local) get the rows of `metrics.jsonl` (same names, same steps), and a resumed run
continues the same tracker run; a missing tracker package is one line naming its extra."""

import glob
import json
import sqlite3
import struct
from pathlib import Path

import pytest
from test_train import tiny_config
from tiny_policy import write_tiny_policy

from jaxrlvr import train
from jaxrlvr.config import ConfigError
from jaxrlvr.rl import preflight
from jaxrlvr.runtime import trackers
from jaxrlvr.runtime.metrics import read_metrics

ALL = "jsonl,tensorboard,wandb,mlflow,trackio"


def wandb_history(workdir) -> list[dict]:
    """The history rows of every offline W&B run file under `workdir/wandb` (the
    LevelDB-log framing of wandb's datastore: 7-byte header, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for path in sorted(glob.glob(str(workdir / "wandb" / "offline-run-*" / "run-*.wandb"))):
        data = Path(path).read_bytes()
        assert data[:4] == b":W&B"
        pos, buf = 7, b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:
                pos += 32768 - pos % 32768
                continue
            _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            buf += data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a whole record, or a record's last piece
                record = pb.Record()
                record.ParseFromString(buf)
                buf = b""
                if record.WhichOneof("record_type") == "history":
                    items = record.history.item
                    rows.append(
                        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
                    )
    return rows


def test_backends_are_checked_before_the_run():
    assert trackers.problems("jsonl,tensorboard") == []
    assert "unknown backend neptune" in trackers.problems("jsonl,neptune")[0]
    assert "must include jsonl" in trackers.problems("tensorboard")[0]


def test_missing_tracker_package_names_its_extra(monkeypatch, tmp_path):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(
        trackers.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name)
    )
    c = tiny_config(tmp_path, tmp_path / "run")
    c.logging.backends = "jsonl,wandb"
    with pytest.raises(ConfigError, match=r"config.logging.backends='jsonl,wandb': wandb needs "
                       r"its package: pip install 'jaxrlvr\[wandb\]'"):  # fmt: skip
        preflight.check_trackers(c)


def test_every_tracker_gets_the_rows_and_a_resume_continues_its_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    policy, workdir = write_tiny_policy(tmp_path / "policy"), tmp_path / "run"

    def run(steps):
        c = tiny_config(policy, workdir, **{"train.steps": steps, "train.checkpoint_every": 1})
        c.train.eval_every, c.train.progress = 0, False
        c.logging.backends, c.logging.project = ALL, "jaxrlvr-test"
        train.Trainer(c).run()
        return json.loads((workdir / "trackers.json").read_text())

    first = run(2)
    again = run(3)  # resumes at step 2
    assert first == again and set(first) == {"wandb", "mlflow", "trackio"}
    want = {r["step"]: trackers.numbers(r) for r in read_metrics(str(workdir))}
    assert sorted(want) == [1, 2, 3]

    history = wandb_history(workdir)
    assert all("_step" in row for row in history), [sorted(r)[:6] for r in history]
    got = {row["_step"]: {k: v for k, v in row.items() if not k.startswith("_")} for row in history}
    assert sorted(got) == [1, 2, 3]
    for step, row in want.items():
        assert got[step] == pytest.approx(row), step

    from mlflow.tracking import MlflowClient

    client = MlflowClient("file:" + str(workdir / "mlruns"))
    run_ = client.get_run(first["mlflow"])
    assert run_.data.params["rollout.n"] == "4"  # the config, logged once
    for key in ("entropy", "loss", "reward_mean"):
        steps = {m.step: m.value for m in client.get_metric_history(first["mlflow"], key)}
        assert steps == pytest.approx({s: row[key] for s, row in want.items()}), key

    db = sqlite3.connect(tmp_path / "trackio" / "jaxrlvr-test.db")
    rows = db.execute("select step, metrics from metrics where run_name = ?", (first["trackio"],))
    got = {s: json.loads(m) for s, m in rows}
    assert sorted(got) == [1, 2, 3]
    for step, row in want.items():
        assert got[step] == pytest.approx(row), step

"""A random tiny Qwen2 with the demo tokenizer and demo data, for trainer tests."""

from pathlib import Path

from flax import nnx

from jaxrlvr.data.arithmetic import save_demo_tokenizer, write_demo_dataset
from jaxrlvr.models import Qwen2, preset, save_hf_checkpoint


def write_tiny_policy(path: Path) -> Path:
    """Checkpoint, tokenizer, `train.jsonl` (64 problems) and `eval.jsonl` (8) in `path`."""
    tok = save_demo_tokenizer(path)
    cfg = preset("tiny", vocab_size=len(tok), hidden_size=32, intermediate_size=64)
    save_hf_checkpoint(Qwen2(cfg, rngs=nnx.Rngs(0)), path, tokenizer=tok)
    write_demo_dataset(path, num_train=64, num_eval=8, max_ops=2)
    return path

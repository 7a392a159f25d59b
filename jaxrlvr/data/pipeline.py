"""Grain pipeline from examples to per-process batches of tokenized prompts.

Design (what the trainer relies on):

- Prompts are rendered (`templates`) and tokenized once, up front. Prompts longer than
  `max_prompt_len` tokens are *dropped*, not truncated (a cut math problem is a
  different problem); the count is logged and kept in `PromptSet.num_dropped`. Prompts
  whose UTF-8 length proves them too long (`token_bound`) are dropped untokenized.
- Batches are *global*: every epoch is a fresh permutation of all N prompts (Grain's
  `MapDataset.shuffle`, reseeded per epoch), cut into batches of `prompts_per_step`; the
  trailing N % prompts_per_step prompts of each epoch are skipped when `drop_remainder`
  (a different few each epoch), so no batch straddles two epochs and `PromptBatch.epoch`
  is exact. Process p of P yields the p-th contiguous slice of each global batch
  (`prompts_per_step / P` prompts), so the processes' slices are disjoint, together
  form exactly the single-process batch, and the data order does not depend on P.
- Iterator state is Grain's (`{"next_index": global batches consumed}`) plus a
  fingerprint of what defines the order (N, prompts_per_step, seed, shuffle,
  drop_remainder); `set_state` refuses a state from a different order. The state is
  JSON-serialisable and the same on every process, and resuming with a different
  process count continues the same global sequence.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grain
import numpy as np

from jaxrlvr.data.sources import Example, read_examples
from jaxrlvr.data.templates import render_prompt
from jaxrlvr.data.token_bound import max_token_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptSet:
    """Tokenized prompts kept after the length filter, aligned lists."""

    input_ids: list[np.ndarray]  # int32 token ids per prompt
    texts: list[str]  # the rendered prompt text the ids encode
    answers: list[str]  # ground truth per prompt
    origins: list[str]  # "file:line" of each prompt's row
    num_dropped: int = 0  # prompts dropped for exceeding max_prompt_len

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class PromptBatch:
    """This process's share of one training step's prompts."""

    input_ids: list[list[int]]  # ragged: token ids per prompt (no padding)
    answers: list[str]
    texts: list[str]  # rendered prompt text
    indices: list[int]  # positions in the PromptSet (stable ids for logging)
    epoch: int  # 0-based epoch every prompt of this batch belongs to
    step: int  # 0-based index of this global batch in the stream

    def __len__(self) -> int:
        return len(self.input_ids)


def prepare_prompts(
    examples: Sequence[Example],
    tokenizer: Any,
    template: str | Sequence[str],
    max_prompt_len: int | None = None,
    chunk_size: int = 4096,
) -> PromptSet:
    """Render, tokenize, and drop prompts longer than `max_prompt_len` tokens (logged).

    `template` is one template for all examples or one per example. Each distinct
    prompt is rendered and tokenized once (DAPO-Math-17k's Parquet repeats every prompt
    ~100 times); repeats share one read-only id array. A rendered prompt of more UTF-8
    bytes than `max_prompt_len` tokens can stand for (`token_bound.max_token_bytes`) is
    dropped without being tokenized: a 50 MB line costs its bytes, not the tokenizer's
    memory.
    """
    templates = [template] * len(examples) if isinstance(template, str) else list(template)
    if len(templates) != len(examples):
        raise ValueError(f"{len(templates)} templates for {len(examples)} examples")
    cache: dict[Any, tuple[str, bool]] = {}
    rendered = []
    for ex, tmpl in zip(examples, templates, strict=True):
        p = ex.prompt
        key = (tmpl, p if isinstance(p, str) else tuple((m["role"], m["content"]) for m in p))
        if key not in cache:
            cache[key] = render_prompt(p, tmpl, tokenizer)
        rendered.append(cache[key])
    bound = max_token_bytes(tokenizer) if max_prompt_len is not None else None
    max_bytes = None if bound is None else max_prompt_len * bound
    too_long = set()
    if max_bytes is not None:
        too_long = {r for r in cache.values() if len(r[0].encode("utf-8")) > max_bytes}
    encoded: dict[tuple[str, bool], np.ndarray] = {}
    for chat in (False, True):  # chat text holds its own special tokens
        todo = sorted({r for r in cache.values() if r[1] == chat} - too_long)
        for lo in range(0, len(todo), chunk_size):
            part = todo[lo : lo + chunk_size]
            enc = tokenizer([text for text, _ in part], add_special_tokens=not chat)
            for r, row in zip(part, enc["input_ids"], strict=True):
                arr = np.asarray(row, dtype=np.int32)
                arr.flags.writeable = False
                encoded[r] = arr
    keep = [
        i
        for i, r in enumerate(rendered)
        if r not in too_long and (max_prompt_len is None or len(encoded[r]) <= max_prompt_len)
    ]
    dropped = len(examples) - len(keep)
    if dropped:
        unread = [i for i, r in enumerate(rendered) if r in too_long]
        log.warning(
            "dropped %d of %d prompts longer than max_prompt_len=%d tokens%s",
            dropped,
            len(examples),
            max_prompt_len,
            f" ({len(unread)} of them over {max_bytes} bytes, not tokenized, the first at "
            f"{examples[unread[0]].origin})"
            if unread
            else "",
        )
    return PromptSet(
        input_ids=[encoded[rendered[i]] for i in keep],
        texts=[rendered[i][0] for i in keep],
        answers=[examples[i].answer for i in keep],
        origins=[examples[i].origin for i in keep],
        num_dropped=dropped,
    )


def load_prompts(
    files: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer: Any,
    template: str = "qwen_chat",
    max_prompt_len: int | None = None,
    prompt_field: str | None = None,
    answer_field: str | None = None,
) -> PromptSet:
    """`read_examples` then `prepare_prompts`."""
    examples = read_examples(files, prompt_field=prompt_field, answer_field=answer_field)
    return prepare_prompts(examples, tokenizer, template, max_prompt_len)


def _mix_seed(seed: int) -> int:
    # Grain reseeds epoch e with seed + e; hashing keeps seed s's epoch 1 from being
    # seed s+1's epoch 0.
    return int(np.random.SeedSequence([seed, 0x6A78]).generate_state(1)[0])


class PromptDataset:
    """Epoch-aware, shuffled, process-sharded batches of a PromptSet (see module doc).

    `prompts_per_step` is the global batch size; this process gets
    `prompts_per_step // process_count` prompts per batch. `num_epochs=None` repeats
    forever. `process_index`/`process_count` default to JAX's.
    """

    def __init__(
        self,
        prompts: PromptSet,
        prompts_per_step: int,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        drop_remainder: bool = True,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise ValueError(f"need 0 <= process_index < process_count, got {process_index}")
        if prompts_per_step < 1 or prompts_per_step % process_count:
            raise ValueError(
                f"prompts_per_step={prompts_per_step} must be a positive multiple of the "
                f"process count {process_count}"
            )
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
        n = len(prompts)
        if drop_remainder and n < prompts_per_step:
            raise ValueError(
                f"only {n} prompts (after dropping {prompts.num_dropped} over-long ones) "
                f"for prompts_per_step={prompts_per_step}"
            )
        if n == 0:
            raise ValueError("no prompts")
        self.prompts = prompts
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        self.drop_remainder = drop_remainder
        self.process_index = process_index
        self.process_count = process_count
        self.local_batch_size = prompts_per_step // process_count
        self.batches_per_epoch = (
            n // prompts_per_step if drop_remainder else -(-n // prompts_per_step)
        )
        self._order = grain.MapDataset.range(n).shuffle(seed=_mix_seed(seed))
        self.dataset: grain.MapDataset[PromptBatch] = (
            grain.MapDataset.range(self.batches_per_epoch)
            .repeat(num_epochs)
            .map_with_index(self._make_batch)
        )

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What determines the global batch sequence; checked by `set_state`."""
        return {
            "num_prompts": len(self.prompts),
            "prompts_per_step": self.prompts_per_step,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_remainder": self.drop_remainder,
        }

    def __len__(self) -> int:
        """Number of batches (sys.maxsize when repeating forever)."""
        return len(self.dataset)

    def _make_batch(self, step: int, _: int) -> PromptBatch:
        n, size = len(self.prompts), self.prompts_per_step
        epoch, j = divmod(step, self.batches_per_epoch)
        end = min((j + 1) * size, n)
        lo = j * size + self.process_index * self.local_batch_size
        hi = min(lo + self.local_batch_size, end)
        positions = range(epoch * n + lo, epoch * n + max(lo, hi))
        if self.shuffle:
            # Grain's shuffled range maps epoch * n + k to the k-th prompt of that epoch's
            # permutation (it reseeds every epoch).
            indices = [int(self._order[k]) for k in positions]
        else:
            indices = [k % n for k in positions]
        p = self.prompts
        return PromptBatch(
            input_ids=[p.input_ids[i].tolist() for i in indices],
            answers=[p.answers[i] for i in indices],
            texts=[p.texts[i] for i in indices],
            indices=indices,
            epoch=epoch,
            step=step,
        )

    def iterator(self) -> PromptBatchIterator:
        """A fresh iterator from the first batch; restore a position with `set_state`."""
        return PromptBatchIterator(self)

    def __iter__(self) -> Iterator[PromptBatch]:
        return self.iterator()


class PromptBatchIterator:
    """Iterator over a PromptDataset with checkpointable state."""

    def __init__(self, ds: PromptDataset):
        self._ds = ds
        # No prefetch threads: batches are list lookups, threads would only compete with
        # the trainer for CPU. Order and state do not depend on this.
        opts = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        self._it = iter(ds.dataset.to_iter_dataset(opts))

    def __iter__(self) -> PromptBatchIterator:
        return self

    def __next__(self) -> PromptBatch:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position: Grain's state plus the dataset fingerprint."""
        return {"grain": self._it.get_state(), **self._ds.fingerprint}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue exactly after the batch at which `state` was taken."""
        fp = self._ds.fingerprint
        diff = {k: (state.get(k), v) for k, v in fp.items() if state.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"data iterator state is for a different data order ({detail})")
        self._it.set_state(state["grain"])

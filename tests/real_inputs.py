r"""Inputs a new user brings, written the way the real ones are (no jaxrlvr code writes them).

- `write_checkpoint`: a tiny Qwen2.5 checkpoint directory: `config.json` as Qwen2.5-0.5B
  ships it (Qwen2ForCausalLM, tied embeddings, a vocabulary padded past the tokenizer's,
  bfloat16 weights) at 2 layers of width 64, random `model.safetensors`, and a byte-level
  BPE tokenizer like Qwen2.5's (`vocab.json`, `merges.txt`, `tokenizer.json`,
  `tokenizer_config.json`; special tokens `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`
  after the BPE ids; no BOS; EOS `<|im_end|>`, pad `<|endoftext|>`) with Qwen2.5's chat
  template, either inline in `tokenizer_config.json` or in `chat_template.jinja`.
- `write_data`: verl-format Parquet for DAPO-Math-17k, MATH-500 and AIME 2024 (columns
  `data_source`, `prompt` as chat messages, `ability`, `reward_model` {`ground_truth`,
  `style`}, `extra_info`), and an AMC 2023 file with `question` / `answer` (a float
  column, as in the published one).

`fixtures/qwen2.5_chat_template.jinja` is the `chat_template` of Qwen2.5's
`tokenizer_config.json`, verbatim. `prompt_id_mismatches` renders the files as the trainer
does and compares with `tokenizer.apply_chat_template(..., tokenize=True)`; it imports only
runtime dependencies, so it runs in a venv with the runtime install alone.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CHAT_TEMPLATE = (FIXTURES / "qwen2.5_chat_template.jinja").read_text()
TEMPLATE_LAYOUTS = (
    "inline",
    "jinja",
)  # tokenizer_config.json["chat_template"] | chat_template.jinja
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2's pre-tokenizer split (tokenizer.json of every Qwen2.5 model).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BPE_VOCAB = 1000  # byte alphabet (256) plus merges; the specials follow
DAPO_INSTRUCTION = (
    "Solve the following math problem step by step. The last line of your response should "
    "be of the form Answer: $Answer (without quotes) where $Answer is the answer to the "
    'problem.\n\n{}\n\nRemember to put your answer on its own line after "Answer:".'
)
MATH500_SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


# --------------------------------------------------------------------------- problems


def problems(n: int, seed: int) -> list[tuple[str, str]]:
    """`n` (problem, answer) pairs of competition-style text: LaTeX, fractions, words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b, c = rng.randint(2, 19), rng.randint(2, 9), rng.randint(1, 40)
        kind = rng.randrange(4)
        if kind == 0:
            out.append(
                (f"What is the value of $ {a}^{{2}} - {b} \\cdot {c} $?", str(a * a - b * c))
            )
        elif kind == 1:
            out.append(
                (
                    f"Find the sum of all positive integers $n$ such that $n < {a + c}$ and "
                    f"$n$ is divisible by ${b}$.",
                    str(sum(k for k in range(1, a + c) if k % b == 0)),
                )
            )
        elif kind == 2:
            out.append(
                (
                    f"A bag holds {a} red and {b} blue marbles. Two are drawn without "
                    "replacement. The probability that both are red is $\\frac{m}{n}$ in "
                    "lowest terms. Find $m + n$.",
                    _both_red(a, b),
                )
            )
        else:
            out.append((f"Simplify $\\frac{{{a * b}}}{{{b * c}}}$.", _fraction(a, c)))
    return out


def _fraction(p: int, q: int) -> str:
    g = np.gcd(p, q)
    p, q = p // g, q // g
    return str(p) if q == 1 else f"\\frac{{{p}}}{{{q}}}"


def _both_red(r: int, b: int) -> str:
    p, q = r * (r - 1), (r + b) * (r + b - 1)
    g = np.gcd(p, q)
    return str(p // g + q // g)


def corpus(seed: int = 0) -> list[str]:
    """Text to train the BPE on: the problems, worked answers, and the prompts' fixed text."""
    lines = [DAPO_INSTRUCTION, MATH500_SUFFIX, QWEN_DEFAULT_SYSTEM, QWEN_MATH_SYSTEM]
    for problem, answer in problems(400, seed):
        lines += [
            problem,
            f"We compute step by step. The answer is $\\boxed{{{answer}}}$.",
            f"Answer: {answer}",
        ]
    return lines * 2


# --------------------------------------------------------------------------- checkpoint


def build_tokenizer(seed: int = 0):
    """A Qwen2.5-style byte-level BPE (`tokenizers.Tokenizer`) trained on `corpus`."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def _tokenizer_config(tok, layout: str) -> dict:
    """`tokenizer_config.json` as Qwen2.5 ships it (`chat_template` only when inline)."""
    decoder = {
        str(tok.token_to_id(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for t in SPECIAL_TOKENS
    }  # fmt: skip
    cfg = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        # The published file says Qwen2Tokenizer; newer saves name the fast class.
        "tokenizer_class": "Qwen2Tokenizer" if layout == "inline" else "Qwen2TokenizerFast",
        "unk_token": None,
    }
    if layout == "inline":
        cfg["chat_template"] = CHAT_TEMPLATE
    return cfg


def write_checkpoint(directory: Path, layout: str, seed: int = 0) -> Path:
    """A tiny Qwen2.5 checkpoint in `directory` with the chat template `layout`."""
    import ml_dtypes
    from safetensors.numpy import save_file

    if layout not in TEMPLATE_LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {TEMPLATE_LAYOUTS}")
    directory.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(seed)
    tok.save(str(directory / "tokenizer.json"))
    tok.model.save(str(directory))  # vocab.json, merges.txt
    (directory / "tokenizer_config.json").write_text(
        json.dumps(_tokenizer_config(tok, layout), indent=2, ensure_ascii=False)
    )
    if layout == "jinja":
        (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    eos, pad = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    d, f, layers, heads, kv_heads = 64, 128, 2, 4, 2
    vocab = -(-tok.get_vocab_size() // 64) * 64  # padded, like 151936 for 151665 tokens
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": pad,
        "eos_token_id": eos,
        "hidden_act": "silu",
        "hidden_size": d,
        "initializer_range": 0.02,
        "intermediate_size": f,
        "max_position_embeddings": 32768,
        "max_window_layers": layers,
        "model_type": "qwen2",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.43.1",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "generation_config.json").write_text(
        json.dumps({"bos_token_id": pad, "eos_token_id": [eos, pad], "pad_token_id": pad})
    )
    rng = np.random.default_rng(seed)
    hd = d // heads

    def normal(*shape):
        return (0.02 * rng.standard_normal(shape)).astype(ml_dtypes.bfloat16)

    tensors = {"model.embed_tokens.weight": normal(vocab, d)}
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors |= {
            f"{p}.input_layernorm.weight": np.ones(d, ml_dtypes.bfloat16),
            f"{p}.post_attention_layernorm.weight": np.ones(d, ml_dtypes.bfloat16),
            f"{p}.self_attn.q_proj.weight": normal(heads * hd, d),
            f"{p}.self_attn.q_proj.bias": normal(heads * hd),
            f"{p}.self_attn.k_proj.weight": normal(kv_heads * hd, d),
            f"{p}.self_attn.k_proj.bias": normal(kv_heads * hd),
            f"{p}.self_attn.v_proj.weight": normal(kv_heads * hd, d),
            f"{p}.self_attn.v_proj.bias": normal(kv_heads * hd),
            f"{p}.self_attn.o_proj.weight": normal(d, heads * hd),
            f"{p}.mlp.gate_proj.weight": normal(f, d),
            f"{p}.mlp.up_proj.weight": normal(f, d),
            f"{p}.mlp.down_proj.weight": normal(d, f),
        }
    tensors["model.norm.weight"] = np.ones(d, ml_dtypes.bfloat16)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


# --------------------------------------------------------------------------- data


def _verl_table(rows: list[dict]):
    import pyarrow as pa

    return pa.Table.from_pylist(rows)


def write_data(directory: Path, seed: int = 1) -> dict[str, Path]:
    """The four data files (`dapo`, `math500`, `aime`, `amc`) in `directory`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    sets = problems(64, seed)
    dapo = [
        {
            "data_source": "math_dapo",
            "prompt": [{"content": DAPO_INSTRUCTION.format(p), "role": "user"}],
            "ability": "MATH",
            "reward_model": {"ground_truth": a, "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": f"{seed:04d}-{i:08x}-dapo"},
        }
        for i, (p, a) in enumerate(sets[:16])
    ]
    math500 = [
        {
            "data_source": "HuggingFaceH4/MATH-500",
            "prompt": [{"role": "user", "content": p + MATH500_SUFFIX}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": a},
            "extra_info": {"split": "test", "index": i},
        }
        for i, (p, a) in enumerate(sets[16:24])
    ]
    aime = [
        {
            "data_source": "aime24",
            "prompt": [{"content": DAPO_INSTRUCTION.format(p), "role": "user"}],
            "ability": "MATH",
            "reward_model": {"ground_truth": a, "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": i, "raw_problem": p, "split": "test"},
        }
        for i, (p, a) in enumerate(sets[24:32])
    ]
    whole = [(p, a) for p, a in sets[32:] if a.lstrip("-").isdigit()][:8]
    amc = pa.table(
        {
            "id": pa.array(range(len(whole)), pa.int64()),
            "question": [p for p, _ in whole],
            "answer": pa.array([float(a) for _, a in whole], pa.float64()),
        }
    )
    paths = {name: directory / f"{name}.parquet" for name in ("dapo", "math500", "aime", "amc")}
    for name, rows in (("dapo", dapo), ("math500", math500), ("aime", aime)):
        pq.write_table(_verl_table(rows), paths[name])
    pq.write_table(amc, paths["amc"])
    return paths


def rows_messages(path: Path) -> list[list[dict]]:
    """The chat messages of each row of a verl-format file (its `prompt` column)."""
    import pyarrow.parquet as pq

    return [
        [{"role": m["role"], "content": m["content"]} for m in row]
        for row in pq.read_table(path, columns=["prompt"]).column("prompt").to_pylist()
    ]


# --------------------------------------------------------------------------- rendered ids


def prompt_id_mismatches(checkpoint: Path, paths: dict[str, Path]) -> list[str]:
    """Where the trainer's prompt ids differ from `apply_chat_template(..., tokenize=True)`.

    The verl files' rows are chat lists, rendered as given (the template adds Qwen's
    default system message); the AMC questions are strings under `qwen_chat`. Returns one
    line per differing prompt (empty when all agree) and raises if nothing was compared.
    """
    from transformers import AutoTokenizer

    from jaxrlvr.data.pipeline import load_prompts

    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    out, compared = [], 0
    for name, path in paths.items():
        if name == "amc":
            import pyarrow.parquet as pq

            questions = pq.read_table(path, columns=["question"]).column("question").to_pylist()
            expected = [
                [{"role": "system", "content": QWEN_MATH_SYSTEM}, {"role": "user", "content": q}]
                for q in questions
            ]
            got = load_prompts(path, tok, "qwen_chat", None, "question", "answer")
        else:
            expected = rows_messages(path)
            got = load_prompts(path, tok, "qwen_chat", None, None, "reward_model.ground_truth")
        if len(got) != len(expected):
            out.append(f"{name}: {len(got)} prompts rendered, {len(expected)} rows")
            continue
        for i, (ids, messages) in enumerate(zip(got.input_ids, expected, strict=True)):
            enc = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            want = list(enc["input_ids"] if isinstance(enc, Mapping) else enc)  # v5: a dict
            have = [int(t) for t in ids]
            compared += 1
            if have != want:
                out.append(f"{name} row {i}: {have[:12]}... != {want[:12]}...")
            elif want.count(im_start) != len(messages) + 1 + (messages[0]["role"] != "system"):
                out.append(f"{name} row {i}: <|im_start|> is not one token: {want[:12]}")
    if not compared:
        raise AssertionError("no prompts compared")
    return out

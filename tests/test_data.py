"""Data pipeline: sources, templates, the Grain batch pipeline, and the arithmetic demo task."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from jaxrlvr.data.arithmetic import (
    ArithmeticProblem,
    build_demo_tokenizer,
    check_answer,
    extract_answer,
    generate_problems,
    save_demo_tokenizer,
    write_demo_dataset,
    write_solution,
)
from jaxrlvr.data.pipeline import PromptDataset, PromptSet, load_prompts, prepare_prompts
from jaxrlvr.data.sources import DataError, Example, read_examples
from jaxrlvr.data.templates import (
    DAPO_PREFIX,
    DAPO_SUFFIX,
    QWEN_MATH_SYSTEM,
    chatml,
    render_prompt,
)

DAPO_ROW = {
    "data_source": "math_dapo",
    "prompt": [{"content": "What is 1+1?", "role": "user"}],
    "ability": "MATH",
    "reward_model": {"ground_truth": "2", "style": "rule-lang"},
    "extra_info": {"index": "a1"},
}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok():
    return build_demo_tokenizer()


# ---------------------------------------------------------------- sources


def test_read_jsonl_fields(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "a.jsonl",
        [{"prompt": "1+1=", "answer": "2"}, {"problem": "2+2=", "answer": 4, "x": 1}, "   "],
    )
    ex = read_examples(path)
    assert ex == [
        Example("1+1=", "2", f"{path}:1"),
        Example("2+2=", "4", f"{path}:2"),
    ]
    q = write_jsonl(tmp_path / "b.jsonl", [{"question": "q", "meta": {"gt": "7"}}])
    assert read_examples(q, prompt_field="question", answer_field="meta.gt")[0].answer == "7"


def test_read_dapo_style_jsonl_and_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    j = write_jsonl(tmp_path / "dapo.jsonl", [DAPO_ROW])
    p = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist([DAPO_ROW]), p)
    for path in (j, p):
        [ex] = read_examples(path, answer_field="reward_model.ground_truth")
        assert ex.prompt == [{"role": "user", "content": "What is 1+1?"}]
        assert ex.answer == "2"
    assert read_examples(p, answer_field="reward_model.ground_truth")[0].origin == f"{p}: row 0"


def test_read_parquet_and_glob_order(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"problem": f"p{i}", "answer": str(i)} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows[:3]), tmp_path / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[3:]), tmp_path / "part-1.parquet")
    ex = read_examples(str(tmp_path / "part-*.parquet"))
    assert [e.prompt for e in ex] == [f"p{i}" for i in range(5)]
    assert ex[4].origin.endswith("part-1.parquet: row 1")


@pytest.mark.parametrize(
    "bad_line, match",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"prompt": "x"}', "missing answer field 'reward_model.ground_truth' or 'answer'"),
        ('{"answer": "1"}', "missing prompt field 'prompt', 'problem' or 'question'"),
        ('{"prompt": 5, "answer": "1"}', "prompt must be a string or a chat list"),
        ('{"prompt": [{"role": "user"}], "answer": "1"}', "chat prompt entries"),
        ('{"prompt": "x", "answer": null}', "answer must be a string or a number"),
        ('{"prompt": "x", "answer": [1]}', "answer must be a string or a number"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path: Path, bad_line: str, match: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "answer": "1"}, "", bad_line])
    with pytest.raises(DataError, match=match) as err:
        read_examples(path)
    assert f"{path}:3:" in str(err.value)


def test_malformed_parquet_names_row(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "bad.parquet"
    rows = [{"prompt": "a", "answer": "1"}, {"prompt": None, "answer": "2"}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=r"bad\.parquet: row 1: prompt must be"):
        read_examples(path)
    with pytest.raises(DataError, match="no answer column 'solution'"):
        read_examples(path, answer_field="solution")


def test_missing_and_unsupported_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        read_examples(missing)
    with pytest.raises(FileNotFoundError, match="no data files match"):
        read_examples(str(tmp_path / "*.parquet"))
    csv = tmp_path / "x.csv"
    csv.write_text("prompt,answer\n")
    with pytest.raises(ValueError, match="unsupported data format"):
        read_examples(csv)


def test_fields_found_per_row_so_formats_mix(tmp_path: Path) -> None:
    """AMC-style `question`/`answer`, verl Parquet (`prompt` chat messages, answer in
    `reward_model.ground_truth`) and MATH-style `problem` read together, no field named."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    amc = write_jsonl(tmp_path / "amc.jsonl", [{"question": "q1", "answer": 3, "id": 0}])
    dapo = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist([DAPO_ROW]), dapo)
    aime = tmp_path / "aime.parquet"
    pq.write_table(pa.Table.from_pylist([{"problem": "q2", "answer": "5"}]), aime)
    got = [(e.prompt, e.answer) for e in read_examples([amc, dapo, aime])]
    assert got == [("q1", "3"), (DAPO_ROW["prompt"], "2"), ("q2", "5")]


def test_read_prompts_per_file_fields_and_templates(tmp_path: Path) -> None:
    from jaxrlvr.config import ConfigError, base_config
    from jaxrlvr.data import read_prompts

    plain = write_jsonl(tmp_path / "plain.jsonl", [{"problem": "1+1=", "answer": "2"}])
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"text": "2+2=", "meta": {"gt": "4"}}])
    c = base_config("demo")
    c.data.prompt_template = "qwen_chat"
    c.data.max_prompt_len = 1000
    c.data.train_files = f"{plain},path={odd},prompt_field=text,answer_field=meta.gt,template=raw"
    ps = read_prompts(c, "train_files", build_demo_tokenizer())
    assert ps.texts == [chatml([{"role": "system", "content": QWEN_MATH_SYSTEM},
                                {"role": "user", "content": "1+1="}]), "2+2="]  # fmt: skip
    assert ps.answers == ["2", "4"] and ps.origins == [f"{plain}:1", f"{odd}:1"]
    c.data.train_files = f"path={odd},prompt_field=question"
    with pytest.raises(ConfigError, match=rf"config.data.train_files: {odd}:1: missing prompt"):
        read_prompts(c, "train_files", build_demo_tokenizer())


def test_non_utf8_jsonl_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "2"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not UTF-8 text \(byte 16 "):
        read_examples(path)
    bom = tmp_path / "bom.jsonl"  # a UTF-8 byte-order mark is not an error
    bom.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "answer": "1"}\n')
    assert read_examples(bom)[0].prompt == "a"


def test_corrupt_parquet_names_file_and_damage(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    rows = [{"prompt": f"problem {i} " * 20, "answer": str(i)} for i in range(300)]
    pq.write_table(pa.Table.from_pylist(rows), good, row_group_size=100, compression="none")
    data = good.read_bytes()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.parquet: not a readable Parquet file \(damaged"):
        read_examples(cut)
    column = pq.ParquetFile(good).metadata.row_group(1).column(0)
    start = column.data_page_offset
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(data[:start] + b"\xff" * 64 + data[start + 64 :])
    with pytest.raises(DataError, match=r"bad\.parquet: row group 1 of 3 \(from row 100\) is dam"):
        read_examples(bad)


def test_urls_are_read_through_fsspec(tmp_path: Path) -> None:
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs = fsspec.filesystem("memory")
    with fs.open("/jaxrlvr-test/amc.jsonl", "w") as f:
        f.write(json.dumps({"question": "q", "answer": "1"}) + "\n")
    with fs.open("/jaxrlvr-test/dapo.parquet", "wb") as f:
        pq.write_table(pa.Table.from_pylist([DAPO_ROW]), f)
    try:
        ex = read_examples(["memory://jaxrlvr-test/*.jsonl", "memory://jaxrlvr-test/dapo.parquet"])
        assert [(e.answer, e.origin) for e in ex] == [
            ("1", f"{fs.unstrip_protocol('/jaxrlvr-test/amc.jsonl')}:1"),  # a glob's match
            ("2", "memory://jaxrlvr-test/dapo.parquet: row 0"),  # as given
        ]
        with pytest.raises(FileNotFoundError, match="memory://jaxrlvr-test/nope.jsonl"):
            read_examples("memory://jaxrlvr-test/nope.jsonl")
        with pytest.raises(DataError, match="nosuchfs://b/x.jsonl"):
            read_examples("nosuchfs://b/x.jsonl")
    finally:
        fs.rm("/jaxrlvr-test", recursive=True)


# ---------------------------------------------------------------- templates


def test_templates_without_chat_template(tok) -> None:
    assert render_prompt("12+7=", "raw", tok) == ("12+7=", False)
    text, chat = render_prompt("What is 1+1?", "qwen_chat", tok)
    assert chat
    assert text == (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within "
        "\\boxed{}.<|im_end|>\n<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n"
    )
    text, _ = render_prompt("What is 1+1?", "dapo", None)
    assert text == chatml([{"role": "user", "content": DAPO_PREFIX + "What is 1+1?" + DAPO_SUFFIX}])
    assert (
        "The last line of your response should be of the form Answer: $Answer (without quotes)"
        in text
    )
    assert text.endswith('after "Answer:".<|im_end|>\n<|im_start|>assistant\n')
    # chat-list prompts are rendered as given, whatever the template
    msgs = [{"role": "user", "content": "hi"}]
    for template in ("raw", "qwen_chat", "dapo"):
        assert render_prompt(msgs, template, None) == (chatml(msgs), True)
    with pytest.raises(ValueError, match="unknown prompt template"):
        render_prompt("x", "alpaca", None)


def test_templates_use_tokenizer_chat_template() -> None:
    tok = build_demo_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    text, chat = render_prompt("1+1=", "qwen_chat", tok)
    assert chat and text == f"[system]{QWEN_MATH_SYSTEM}[user]1+1=[assistant]"


def test_prepare_prompts_tokenizes_and_drops_long(tok, caplog) -> None:
    examples = [Example("1+2=", "3", "f:1"), Example("10+20+30=", "60", "f:2")]
    ps = prepare_prompts(examples, tok, "raw", max_prompt_len=6)
    assert len(ps) == 1 and ps.num_dropped == 1
    assert "dropped 1 of 2 prompts" in caplog.text
    assert ps.input_ids[0].dtype == np.int32
    assert ps.input_ids[0].tolist() == [
        tok.bos_token_id,
        *tok("1+2=", add_special_tokens=False)["input_ids"],
    ]
    assert ps.answers == ["3"] and ps.texts == ["1+2="] and ps.origins == ["f:1"]
    # a repeated prompt is tokenized once and shares its (read-only) ids
    ps = prepare_prompts([Example("1+2=", "3", "f:1"), Example("1+2=", "3", "f:2")], tok, "raw")
    assert ps.input_ids[0] is ps.input_ids[1] and not ps.input_ids[0].flags.writeable
    # chat-rendered text already holds its special tokens: none are added
    ps = prepare_prompts([Example([{"role": "user", "content": "1"}], "1", "f:1")], tok, "raw")
    assert ps.input_ids[0][0] != tok.bos_token_id


def test_dapo_template_is_dapo_math_17k_text() -> None:
    """DAPO-Math-17k's own prompt, to the character (its last period included)."""
    assert DAPO_PREFIX + "P" + DAPO_SUFFIX == (
        "Solve the following math problem step by step. The last line of your response "
        "should be of the form Answer: $Answer (without quotes) where $Answer is the answer "
        'to the problem.\n\nP\n\nRemember to put your answer on its own line after "Answer:".'
    )


class SpyTokenizer:
    """A tokenizer that records every text it is asked to tokenize."""

    def __init__(self, tok):
        self.tok, self.seen = tok, []

    def __call__(self, texts, **kw):
        self.seen += list(texts)
        return self.tok(texts, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_over_long_prompt_is_dropped_untokenized(tok, caplog) -> None:
    huge = "1+" * 100_000 + "1="
    examples = [
        Example("1+2=", "3", "f:1"),
        Example(huge, "x", "big.jsonl:2"),
        Example("10+20+30=", "60", "f:3"),
    ]
    spy = SpyTokenizer(tok)
    ps = prepare_prompts(examples, spy, "raw", max_prompt_len=6)
    assert ps.texts == ["1+2="] and ps.num_dropped == 2
    assert huge not in spy.seen and sorted(spy.seen) == ["1+2=", "10+20+30="]
    # the demo tokenizer: one character (<= 4 bytes) or `<bos>` (5 bytes) per token
    assert (
        "dropped 2 of 3 prompts longer than max_prompt_len=6 tokens (1 of them over 30 bytes, "
        "not tokenized, the first at big.jsonl:2)" in caplog.text
    )


def byte_level_bpe(**added):
    """A small Qwen2-like tokenizer: NFC, byte-level BPE, ChatML special tokens."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    special = [AddedToken(t, special=True, **added) for t in ("<|im_start|>", "<|im_end|>")]
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=special
    )
    tk.train_from_iterator(
        ["What is 1+1? The answer is 2.     ---- ====", "\u00e9t\u00e9"] * 50, trainer
    )
    return PreTrainedTokenizerFast(tokenizer_object=tk)


def test_max_token_bytes_bounds_the_tokens_of_any_text(tok) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from jaxrlvr.data.token_bound import max_token_bytes

    texts = [
        "What is 1+1? The answer is 2." * 5,
        "<|im_start|>user\n\u00e9t\u00e9<|im_end|>" * 3,
        "e\u0301" * 40,  # NFC composes each pair: 3 bytes -> 2
        "\u1100\u1161\u11a8" * 20,  # Hangul jamo: 9 bytes -> one 3-byte syllable
        "\U0001d400 " * 30 + " " * 100 + "-" * 100,
    ]
    bpe = byte_level_bpe()
    for t in (bpe, tok):
        bound = max_token_bytes(t)
        assert bound is not None
        for text in texts:
            n = len(t(text, add_special_tokens=False)["input_ids"])
            assert n * bound >= len(text.encode("utf-8")), (text[:20], n, bound)
    assert max_token_bytes(tok) == 5  # `<bos>`; a character is at most 4 bytes
    # no bound where a token can stand for unbounded text: dropped whitespace, stripping
    # normalizers or added tokens, whole words of a word-level vocabulary
    words = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    assert max_token_bytes(PreTrainedTokenizerFast(tokenizer_object=words)) is None
    strip = byte_level_bpe()
    strip.backend_tokenizer.normalizer = normalizers.Strip()
    assert max_token_bytes(strip) is None
    assert max_token_bytes(byte_level_bpe(rstrip=True)) is None
    assert max_token_bytes(object()) is None  # a slow tokenizer: tokenized in full


# ---------------------------------------------------------------- pipeline


def make_set(n: int) -> PromptSet:
    return PromptSet(
        input_ids=[np.asarray([1, i], np.int32) for i in range(n)],
        texts=[f"t{i}" for i in range(n)],
        answers=[str(i) for i in range(n)],
        origins=[f"f:{i + 1}" for i in range(n)],
    )


def ds1(ps: PromptSet, size: int, **kw) -> PromptDataset:
    """A single-process dataset."""
    return PromptDataset(ps, size, process_count=1, process_index=0, **kw)


def take(ds: PromptDataset, k: int) -> list:
    it = ds.iterator()
    return [next(it) for _ in range(k)]


def test_batches_deterministic_by_seed() -> None:
    ps = make_set(50)
    a = [b.indices for b in take(ds1(ps, 8, seed=3), 12)]
    b = [b.indices for b in take(ds1(ps, 8, seed=3), 12)]
    c = [b.indices for b in take(ds1(ps, 8, seed=4), 12)]
    assert a == b and a != c
    batch = take(ds1(ps, 8, seed=3), 1)[0]
    i = batch.indices[0]
    assert len(batch) == 8
    assert batch.input_ids[0] == [1, i] and batch.answers[0] == str(i) and batch.texts[0] == f"t{i}"


def test_epochs() -> None:
    ps = make_set(20)
    ds = ds1(ps, 6, seed=0, num_epochs=3)
    assert ds.batches_per_epoch == 3 and len(ds) == 9
    batches = list(ds)
    assert [b.epoch for b in batches] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [b.step for b in batches] == list(range(9))
    orders = []
    for e in range(3):
        idx = [i for b in batches[3 * e : 3 * e + 3] for i in b.indices]
        assert len(idx) == len(set(idx)) == 18  # no repeats within an epoch; 2 dropped
        orders.append(idx)
    assert orders[0] != orders[1] != orders[2]  # reshuffled every epoch
    # unshuffled, no drop: every prompt once per epoch, in order, short last batch
    ds = ds1(ps, 6, shuffle=False, num_epochs=2, drop_remainder=False)
    batches = list(ds)
    assert [len(b) for b in batches] == [6, 6, 6, 2] * 2
    assert [i for b in batches[:4] for i in b.indices] == list(range(20))
    assert batches[4].epoch == 1 and batches[4].indices == list(range(6))


def test_sharding_two_processes() -> None:
    ps = make_set(37)
    full = take(ds1(ps, 8, seed=5), 8)
    shards = [
        take(PromptDataset(ps, 8, seed=5, process_count=2, process_index=p), 8) for p in (0, 1)
    ]
    seen = set()
    for step in range(8):
        a, b = shards[0][step], shards[1][step]
        assert len(a) == len(b) == 4
        assert not set(a.indices) & set(b.indices)
        assert a.indices + b.indices == full[step].indices
        assert a.epoch == b.epoch == full[step].epoch
        if a.epoch == 0:
            seen |= set(a.indices) | set(b.indices)
    assert len(seen) == 32  # epoch 0 covered 4 batches x 8 distinct prompts
    with pytest.raises(ValueError, match="multiple of the process count"):
        PromptDataset(ps, 7, process_count=2, process_index=0)


def test_iterator_state_resume() -> None:
    ps = make_set(30)
    ds = ds1(ps, 4, seed=11)
    it = ds.iterator()
    for _ in range(9):  # crosses an epoch boundary (7 batches per epoch)
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(10)]
    resumed = ds1(ps, 4, seed=11).iterator()
    resumed.set_state(state)
    got = [next(resumed) for _ in range(10)]
    assert got == expected
    assert got[0].step == 9 and got[0].epoch == 1
    # a state from a different data order is refused
    other = ds1(ps, 4, seed=12).iterator()
    with pytest.raises(ValueError, match="seed: saved 11, now 12"):
        other.set_state(state)
    # the state is global: a 2-process run resumes the same sequence
    shard = PromptDataset(ps, 4, seed=11, process_count=2, process_index=1).iterator()
    shard.set_state(state)
    assert next(shard).indices == expected[0].indices[2:]


def test_too_few_prompts_and_jax_defaults() -> None:
    with pytest.raises(ValueError, match="only 3 prompts"):
        PromptDataset(make_set(3), 4, process_count=1, process_index=0)
    ds = PromptDataset(make_set(8), 4)  # process index and count from JAX: 0 of 1 here
    assert (ds.process_index, ds.process_count, ds.local_batch_size) == (0, 1, 4)


# ---------------------------------------------------------------- demo task


def test_generator_deterministic_and_varied() -> None:
    a = generate_problems(200, seed=7)
    assert a == generate_problems(200, seed=7)
    assert a != generate_problems(200, seed=8)
    assert {len(p.ops) for p in a} == {1, 2, 3, 4}
    assert all(0 <= x <= 99 for p in a for x in p.operands)
    assert any(p.answer < 0 for p in a)


def test_solutions_are_correct() -> None:
    for p in generate_problems(300, seed=1):
        sol = write_solution(p)
        assert p.answer == eval(p.prompt[:-1])  # digits and +/- only
        steps = sol.split(";")
        assert steps[-1] == f"#{p.answer}" and len(steps) == len(p.ops) + 1
        for step in steps[:-1]:
            lhs, rhs = step.split("=")
            assert eval(lhs) == int(rhs)
        assert check_answer(sol, p.answer) and check_answer(sol, str(p.answer))
        assert not check_answer(sol, p.answer + 1)
    p = ArithmeticProblem((12, 7, 5), ("+", "-"))
    assert p.prompt == "12+7-5=" and write_solution(p) == "12+7=19;19-5=14;#14"
    assert write_solution(ArithmeticProblem((3, 50), ("-",))) == "3-50=-47;#-47"
    assert extract_answer("3-50=-47;#-47") == -47 and extract_answer("3-50=-47") is None


def test_noisy_solutions() -> None:
    rng = np.random.default_rng(0)
    problems = generate_problems(400, seed=2)
    right = [check_answer(write_solution(p, rng, 0.3), p.answer) for p in problems]
    assert 0.2 < np.mean(right) < 0.9
    assert write_solution(problems[0], rng, 0.0) == write_solution(problems[0])


def test_tokenizer_round_trip_and_save_load(tmp_path: Path, tok) -> None:
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = "12+7-5=12+7=19;19-5=14;#-14"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode([*ids, tok.eos_token_id], skip_special_tokens=True) == text
    save_demo_tokenizer(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert loaded(text)["input_ids"] == ids
    assert (loaded.pad_token_id, loaded.eos_token_id, len(loaded)) == (0, 2, len(tok))
    assert loaded.decode(ids, skip_special_tokens=True) == text


def test_demo_dataset_through_the_data_path(tmp_path: Path, tok) -> None:
    paths = write_demo_dataset(tmp_path, num_train=64, num_eval=16, seed=0)
    train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    evals = [json.loads(line) for line in paths["eval"].read_text().splitlines()]
    assert len(train) == 64 and len(evals) == 16
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    assert all(check_answer(r["solution"], r["answer"]) for r in train)
    ps = load_prompts(paths["train"], tok, template="raw", max_prompt_len=64)
    assert len(ps) == 64 and ps.num_dropped == 0
    batch = next(ds1(ps, 16, seed=0).iterator())
    i = batch.indices[0]
    assert tok.decode(batch.input_ids[0], skip_special_tokens=True) == train[i]["prompt"]
    assert batch.answers[0] == train[i]["answer"]
    assert write_demo_dataset(tmp_path / "again", 64, 16, seed=0)["train"].read_text() == (
        paths["train"].read_text()
    )

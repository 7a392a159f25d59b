"""A provable bound on how much text one token stands for, to drop over-long prompts
before tokenizing them.

If every token of a tokenizer stands for at most B bytes of its input text, a text of
more than `max_prompt_len * B` UTF-8 bytes has more than `max_prompt_len` tokens, so
the length filter would drop it anyway: `max_token_bytes` returns B, read from the fast
tokenizer's own description (`tokenizer.json`), and None where no bound can be proven
(the prompt is then tokenized in full, as before). The argument, part by part:

- Normalizer: the model sees the normalized text. NFC/NFD/NFKC/NFKD and Lowercase map a
  text to one at least a quarter of its bytes (the largest shrink is a 4-byte character
  to a 1-byte one, e.g. NFKC's U+1D400 to `A`; compositions such as Hangul jamo shrink
  at most 3x), so each multiplies B by 4; none is 1. Any other normalizer (Strip,
  Replace, Precompiled, BertNormalizer, ...) can delete text: no bound.
- Pre-tokenizer: ByteLevel, Metaspace, Digits, UnicodeScripts, and Split / Punctuation
  that keep what they match only cut the text (or add to it); ones that drop text
  (Whitespace, WhitespaceSplit, Bert, CharDelimiterSplit, `behavior="removed"`): no bound.
- Model: a BPE token is a vocabulary entry; under ByteLevel each character of an entry is
  one input byte (Qwen2.5, GPT-2), otherwise an entry's UTF-8 bytes bound what it covers
  (prefix/suffix markers only make it longer); an unknown character is one token (at
  most 4 bytes) unless `fuse_unk` merges a run of them into one (no bound). A WordLevel
  token is one pre-token, bounded only when the pre-tokenizer isolates single characters
  (the demo's character tokenizer: 4 bytes). Unigram and WordPiece: no bound.
- Added tokens (`<|im_start|>`, ...) cover their own content, unless they strip the
  whitespace around them (`lstrip`/`rstrip`: no bound).
"""

from __future__ import annotations

import json
from typing import Any

_UNICODE_NORMALIZERS = ("NFC", "NFD", "NFKC", "NFKD", "Lowercase")
_KEEPING_PRE_TOKENIZERS = ("ByteLevel", "Metaspace", "Digits", "UnicodeScripts")
_ONE_CHARACTER = ("[\\s\\S]", "[\\S\\s]", "(?s).")
MAX_CHAR_BYTES = 4  # the longest UTF-8 encoding of one character


def _shrink(normalizer: dict | None) -> int | None:
    """How many times shorter (in bytes) the normalized text can be, or None."""
    if normalizer is None:
        return 1
    kind = normalizer.get("type")
    if kind == "Sequence":
        total = 1
        for part in normalizer.get("normalizers", []):
            if (factor := _shrink(part)) is None:
                return None
            total *= factor
        return total
    if kind in _UNICODE_NORMALIZERS:
        return MAX_CHAR_BYTES
    if kind == "Prepend":
        return 1
    return None


def _pre_tokenizers(pre: dict | None) -> list[dict] | None:
    """The pre-tokenizer's parts if each keeps all of its input, else None."""
    if pre is None:
        return []
    if pre.get("type") == "Sequence":
        parts: list[dict] = []
        for p in pre.get("pretokenizers", []):
            if (sub := _pre_tokenizers(p)) is None:
                return None
            parts += sub
        return parts
    kind = pre.get("type")
    if kind in _KEEPING_PRE_TOKENIZERS:
        return [pre]
    if kind in ("Split", "Punctuation") and str(pre.get("behavior", "")).lower() != "removed":
        return [pre]
    return None


def _isolates_characters(parts: list[dict]) -> bool:
    return any(
        p.get("type") == "Split"
        and str(p.get("behavior", "")).lower() == "isolated"
        and not p.get("invert", False)
        and (p.get("pattern") or {}).get("Regex") in _ONE_CHARACTER
        for p in parts
    )


def _model_bound(model: dict, parts: list[dict]) -> int | None:
    kind = model.get("type")
    if kind == "BPE":
        if model.get("unk_token") is not None and model.get("fuse_unk"):
            return None
        byte_level = any(p.get("type") == "ByteLevel" for p in parts)
        vocab = model.get("vocab") or {}
        width = len if byte_level else (lambda t: len(t.encode("utf-8")))
        longest = max((width(t) for t in vocab), default=0)
        return max(longest, MAX_CHAR_BYTES if model.get("unk_token") is not None else 1)
    if kind == "WordLevel" and _isolates_characters(parts):
        return MAX_CHAR_BYTES
    return None


def max_token_bytes(tokenizer: Any) -> int | None:
    """Most UTF-8 bytes of input text one token of `tokenizer` can stand for, or None
    when the tokenizer admits no such bound (module docstring)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    shrink = _shrink(spec.get("normalizer"))
    parts = _pre_tokenizers(spec.get("pre_tokenizer"))
    if shrink is None or parts is None:
        return None
    per_token = _model_bound(spec.get("model") or {}, parts)
    added = spec.get("added_tokens") or []
    if per_token is None or any(t.get("lstrip") or t.get("rstrip") for t in added):
        return None
    longest_added = max((len(t["content"].encode("utf-8")) for t in added), default=0)
    return max(per_token, longest_added) * shrink

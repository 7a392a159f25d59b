r"""Prompt templates: how a problem becomes the text the policy continues.

- `qwen_chat`: chat messages `[system QWEN_MATH_SYSTEM, user problem]`, the Qwen2.5-Math
  evaluation prompt, with exactly this system text:
  `Please reason step by step, and put your final answer within \boxed{}.`
- `dapo`: one user message holding the DAPO-Math-17k instruction around the problem
  (`DAPO_PREFIX + problem + DAPO_SUFFIX`; the reward reads its `Answer:` line); no
  system message is added, so the tokenizer's chat template adds its default, as in
  DAPO's own training.
- `raw`: the string as is (the demo task, base-model continuation).

Chat messages are rendered with the tokenizer's chat template (`add_generation_prompt`)
when it has one, else with Qwen's ChatML by hand (`chatml`), so the text is the same as
Qwen's template produces. A prompt that is already a chat list (DAPO-Math-17k rows) is
rendered as given under every template: the data set already chose its messages.
"""

from __future__ import annotations

from typing import Any

from jaxrlvr.data.sources import Message, Prompt

TEMPLATES: tuple[str, ...] = ("qwen_chat", "dapo", "raw")

QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should "
    "be of the form Answer: $Answer (without quotes) where $Answer is the answer to the "
    "problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'


def chatml(messages: list[Message]) -> str:
    """Qwen's ChatML rendering of `messages`, ending with an open assistant turn."""
    body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return body + "<|im_start|>assistant\n"


def render_messages(messages: list[Message], tokenizer: Any | None) -> str:
    """The tokenizer's chat template applied to `messages` if it has one, else `chatml`."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return chatml(messages)


def template_messages(prompt: Prompt, template: str) -> list[Message] | None:
    """The chat messages for `prompt` under `template`, or None for plain text (`raw`)."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; choose one of {TEMPLATES}")
    if isinstance(prompt, list):
        return [dict(m) for m in prompt]
    if template == "qwen_chat":
        return [
            {"role": "system", "content": QWEN_MATH_SYSTEM},
            {"role": "user", "content": prompt},
        ]
    if template == "dapo":
        return [{"role": "user", "content": DAPO_PREFIX + prompt + DAPO_SUFFIX}]
    return None


def render_prompt(prompt: Prompt, template: str, tokenizer: Any | None = None) -> tuple[str, bool]:
    """(prompt text, whether it came from a chat rendering).

    Chat-rendered text already holds its special tokens, so it is tokenized without
    adding any (`add_special_tokens=False`); raw text gets the tokenizer's usual ones.
    """
    messages = template_messages(prompt, template)
    if messages is None:
        return str(prompt), False
    return render_messages(messages, tokenizer), True

"""Zero-shot QA prompts in InstructRetro's format (REFERENCE §5.1, Megatron
`tools/retro/sft/dataset_conv.py::reformat_prompt`), or the same content through a tokenizer's
chat template.

instructretro:
    System: This is a chat between ... found in the context.\\n\\n
    title: <t1>, source: <passage 1>\\n\\n ... title: <tk>, source: <passage k>\\n\\n
    User: Answer the following question with a short span. <question>\\n\\n
    Assistant: The answer is

The passages are cut (in tokens) so that the prompt plus the answer fits `max_prompt_tokens`.
Generation stops at end-of-text or when the model starts a new `User:` turn; short-span answers
also stop at the first newline.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

PromptFormat = Literal["instructretro", "chat"]

SYSTEM = ("This is a chat between a user and an artificial intelligence assistant. The "
          "assistant gives helpful, detailed, and polite answers to the user's questions based "
          "on the context. The assistant should also indicate when the answer cannot be found "
          "in the context.")
SHORT_SPAN = "Answer the following question with a short span. "
ANSWER_PREFIX = "The answer is"
STOP_SEQUENCES = ["\nUser:", "User:", "<|endoftext|>", "<|im_end|>", "</s>"]


def format_passage(title: str, text: str) -> str:
    """One retrieved passage the way InstructRetro feeds it: `title: ..., source: ...`."""
    return f"title: {title}, source: {text}"


def build_prompt(fmt: PromptFormat, question: str, passages: Sequence[str], tokenizer: Any,
                 max_prompt_tokens: int, answer_tokens: int) -> list[int]:
    """Token ids of the QA prompt.

    Args:
        fmt: `instructretro` (plain text turns) or `chat` (the tokenizer's chat template).
        question: the question text.
        passages: formatted passages (`format_passage`), best first; empty for no context.
        tokenizer: a transformers tokenizer (`encode`/`decode`, `apply_chat_template` for chat).
        max_prompt_tokens: budget for prompt + answer; the context is cut to fit.
        answer_tokens: tokens reserved for the answer.
    """
    user = SHORT_SPAN + question.strip()
    context = "\n\n".join(passages) + "\n\n" if passages else ""
    if fmt == "instructretro":
        head, tail = f"System: {SYSTEM}\n\n", f"User: {user}\n\nAssistant: {ANSWER_PREFIX}"
    else:
        head, tail = "", ""
    fixed = len(_encode(tokenizer, head + tail)) + (64 if fmt == "chat" else 0)
    context = _cut(tokenizer, context, max_prompt_tokens - answer_tokens - fixed)
    if fmt == "instructretro":
        return _encode(tokenizer, head + context + tail)
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": context + user}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return _encode(tokenizer, text + ANSWER_PREFIX)


def clean_answer(text: str) -> str:
    """The generated span up to a stop sequence or newline, trimmed."""
    for stop in STOP_SEQUENCES:
        text = text.split(stop, 1)[0]
    return text.strip().split("\n", 1)[0].strip()


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _cut(tokenizer: Any, text: str, budget: int) -> str:
    if not text:
        return text
    ids = _encode(tokenizer, text)
    if len(ids) <= budget:
        return text
    return tokenizer.decode(ids[:max(budget, 0)]) + "\n\n" if budget > 0 else ""


# RA-DIT's prompt: each retrieved chunk goes alone, as "Background: ...", before the
# instruction. The same layout serves RA-IT training rows, LSR scoring and REPLUG inference, so
# the LM sees at test time exactly what it was tuned on:
#     System: <system>\n\nUser: Background: <chunk>\n\n<instruction>\n\nAssistant: <answer>
BACKGROUND = "Background: {text}\n\n"
"""Paper format (REFERENCE §6): the chunk, then a blank line, then the task."""


def with_background(turns: Sequence[tuple[str, str]], chunk: str) -> list[tuple[str, str]]:
    """The conversation with `chunk` put before the last user instruction."""
    turns = list(turns)
    user, answer = turns[-1]
    return turns[:-1] + [(BACKGROUND.format(text=chunk.strip()) + user, answer)]


def cut_tokens(tokenizer: Any, text: str, n: int) -> str:
    """`text` cut to its first `n` tokens (unchanged when shorter)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return text if len(ids) <= n else tokenizer.decode(ids[:n])

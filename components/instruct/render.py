"""InstructRetro's chat rendering and answer-only loss mask (REFERENCE §4; Megatron
`tools/retro/sft/dataset_conv.py`).

    System: <system text>\\n\\nUser: <u1>\\n\\nAssistant: <a1>\\n\\nUser: <u2>\\n\\nAssistant:| <a2><EOD><EOD>...

The prompt (everything up to and including the last "Assistant:") and the answer (" " + a2) are
tokenized separately, as Megatron does. The loss covers the final answer's tokens and the one EOD
after it; the prompt, earlier turns and the EOD padding carry zero weight.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

SYSTEM = ("System: This is a chat between a user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def render(turns: Sequence[tuple[str, str]], system: str = SYSTEM) -> tuple[str, str]:
    """(prompt, answer) text of a conversation whose last assistant message is the answer."""
    history = "".join(f"User: {u}\n\nAssistant: {a}\n\n" for u, a in turns[:-1])
    return f"{system}\n\n{history}User: {turns[-1][0]}\n\nAssistant:", " " + turns[-1][1]


def encode(turns: Sequence[tuple[str, str]], tokenize: Callable[[str], list[int]], eod: int,
           seq_length: int, system: str = SYSTEM) -> tuple[np.ndarray, np.ndarray, bool]:
    """One training row of `seq_length + 1` tokens and its loss mask.

    Too long a sample keeps the end of the prompt (the question and "Assistant:") and at least
    half the row for the answer, whose tail is cut last.

    Args:
        turns: (user, assistant) pairs; the last assistant message is the answer.
        tokenize: text -> token ids (no special tokens added).
        eod: end-of-document id, appended after the answer and used as padding.
        seq_length: model input length; rows hold seq_length + 1 tokens.
        system: the system text.

    Returns:
        (tokens int32 [seq_length + 1], mask uint8 [seq_length + 1], truncated?).
        `mask[t] = 1` where predicting token t counts: the answer tokens and the EOD after them.
    """
    prompt_text, answer_text = render(turns, system)
    prompt, answer = tokenize(prompt_text), tokenize(answer_text)
    room = seq_length                     # row width seq_length + 1, minus the EOD
    truncated = len(prompt) + len(answer) > room
    if truncated:
        keep_answer = min(len(answer), max(room - len(prompt), room // 2))
        keep_prompt = room - keep_answer
        prompt, answer = prompt[len(prompt) - keep_prompt:], answer[:keep_answer]
    tokens = np.full(seq_length + 1, eod, dtype=np.int32)
    mask = np.zeros(seq_length + 1, dtype=np.uint8)
    n_p, n_a = len(prompt), len(answer)
    tokens[:n_p] = prompt
    tokens[n_p:n_p + n_a] = answer
    mask[n_p:n_p + n_a + 1] = 1          # the answer and its EOD
    return tokens, mask, truncated

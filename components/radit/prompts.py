"""RA-DIT's prompt: each retrieved chunk goes alone, as "Background: ...", before the instruction.

The same layout serves RA-IT training rows, LSR scoring and REPLUG inference, so the LM sees at
test time exactly what it was tuned on:

    System: <system text>\\n\\nUser: Background: <chunk>\\n\\n<instruction>\\n\\nAssistant: <answer>

The QA evaluator's instruction is InstructRetro's short-span one, and its answer starts with
"The answer is" (components/evaluators/prompts.py), which the `qa-pairs` source reproduces.
"""

from __future__ import annotations

from typing import Sequence

BACKGROUND = "Background: {text}\n\n"
"""Paper format (REFERENCE §6): the chunk, then a blank line, then the task."""


def with_background(turns: Sequence[tuple[str, str]], chunk: str) -> list[tuple[str, str]]:
    """The conversation with `chunk` put before the last user instruction."""
    turns = list(turns)
    user, answer = turns[-1]
    return turns[:-1] + [(BACKGROUND.format(text=chunk.strip()) + user, answer)]

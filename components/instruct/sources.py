"""Blend sources: one loader per instruction-data format, each a `blend-source` component.

Every loader turns its files into `Conversation`s: (user, assistant) turns whose last assistant
message is the answer the loss is computed on. A record missing a required field is an
`InputDataError` naming file and line; a record whose answer is empty is skipped and counted.
Files may be plain or gzipped; `path` may be a file, a directory or a glob.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Optional

from pydantic import Field, model_validator

from retro.platform.errors import InputDataError
from retro.platform.registry import StrictModel, register, registry
from retro.platform.spec.types import DataPath


@dataclass
class Conversation:
    """A rendered-to-be sample: `turns[-1][1]` is the answer; `where` is file:line."""

    turns: list[tuple[str, str]]
    where: str


@dataclass
class Loaded:
    """A source's usable conversations plus what was skipped and the files' content hash."""

    conversations: list[Conversation]
    skipped: int = 0
    files: list[str] = field(default_factory=list)
    sha256: str = ""


class Template(StrictModel):
    """Format strings turning one record's fields into the user turn and the answer."""

    user: Optional[str] = None
    """User turn, e.g. `"{instruction}\\n\\n{input}"`; None: the format's default."""
    assistant: Optional[str] = None
    """Answer, e.g. `"{rationale}\\nSo the answer is {answer}."`; None: the format's default."""


class SourceConfig(StrictModel):
    """Fields every blend source has. Give at most one of `weight`, `samples`, `epochs`;
    none means `weight: 1`."""

    FIELDS: ClassVar[tuple[str, ...]] = ()
    DEFAULT: ClassVar[tuple[str, str]] = ("", "")

    path: DataPath
    """File, directory or glob of this source's data (plain or .gz)."""
    weight: Optional[float] = Field(None, gt=0)
    """Share of the samples left after the `samples`/`epochs` sources, relative to the other
    weighted sources (Megatron's sampling probability)."""
    samples: Optional[int] = Field(None, ge=1)
    """Exact number of training samples drawn from this source (cycling if above its size)."""
    epochs: Optional[float] = Field(None, gt=0)
    """Passes over this source: samples = round(epochs * records)."""
    template: Optional[Template] = None
    """How a record's fields become the user turn and answer (format strings over the
    format's fields); None: the format's default."""

    @model_validator(mode="after")
    def _check(self) -> "SourceConfig":
        given = [n for n in ("weight", "samples", "epochs") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of weight, samples, epochs (got {', '.join(given)})")
        if self.template is not None:
            if not self.FIELDS:
                raise ValueError("this format is a conversation with no per-record fields: "
                                 "remove `template`")
            for side in ("user", "assistant"):
                fmt = getattr(self.template, side)
                names = {f for _, f, _, _ in string.Formatter().parse(fmt or "") if f}
                unknown = names - set(self.FIELDS)
                if unknown:
                    raise ValueError(f"template.{side} uses unknown field(s) "
                                     f"{sorted(unknown)}; this format has {list(self.FIELDS)}")
        return self

    def render_fields(self, rec: dict[str, Any]) -> tuple[str, str]:
        """(user, answer) of a record through the template (the format default if unset)."""
        user = (self.template.user if self.template and self.template.user else self.DEFAULT[0])
        ans = (self.template.assistant if self.template and self.template.assistant
               else self.DEFAULT[1])
        values = {k: ("" if rec.get(k) is None else str(rec.get(k))) for k in self.FIELDS}
        return user.format(**values).strip(), ans.format(**values).strip()


# ------------------------------------------------------------------------------ file helpers
class InstructionInputOutput(SourceConfig):
    """Records with Alpaca's fields (alpaca, self-instruct, lima)."""

    FIELDS: ClassVar[tuple[str, ...]] = ("instruction", "input", "output")
    DEFAULT: ClassVar[tuple[str, str]] = ("{instruction}\n\n{input}", "{output}")


def source_files(path: str) -> list[Path]:
    """Files named by `path` (file, directory or glob), sorted; raises if there are none."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.endswith(".md"))
    elif any(ch in path for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(path, recursive=True) if Path(f).is_file())
    else:
        files = [p] if p.is_file() else []
    if not files:
        raise InputDataError(f"blend source path {path!r} names no file; point `path` at a "
                             "file, a directory or a glob of this source's data")
    return files


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" \
        else open(path, encoding="utf-8")


def files_sha256(files: list[Path]) -> str:
    """Content hash of the files (names excluded, order as given)."""
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def jsonl_records(files: list[Path]) -> Iterator[tuple[str, dict]]:
    for f in files:
        with _open(f) as fh:
            for i, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        yield f"{f}:{i}", json.loads(line)
                    except json.JSONDecodeError as e:
                        raise InputDataError(f"{f}:{i}: not valid JSON ({e.msg})") from None


def json_array_records(files: list[Path]) -> Iterator[tuple[str, dict]]:
    for f in files:
        with _open(f) as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as e:
                raise InputDataError(f"{f}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise InputDataError(f"{f}: expected a JSON array of records, got "
                                 f"{type(data).__name__}")
        for i, rec in enumerate(data):
            yield f"{f}[{i}]", rec


def require(rec: Any, where: str, fmt: str, *names: str) -> None:
    """Raise InputDataError if `rec` is not a mapping holding every field in `names`."""
    if not isinstance(rec, dict):
        raise InputDataError(f"{where}: a {fmt} record must be an object, got "
                             f"{type(rec).__name__}")
    missing = [n for n in names if n not in rec]
    if missing:
        raise InputDataError(f"{where}: {fmt} record is missing field(s) {missing} (has "
                             f"{sorted(rec)}); is `type: {fmt}` the right format for this file?")


def collect(records: Iterator[tuple[str, Any]], to_turns) -> Loaded:
    """Run `to_turns(rec, where) -> turns | None` over records; None (empty answer) = skipped."""
    out = Loaded([])
    for where, rec in records:
        turns = to_turns(rec, where)
        if not turns or not turns[-1][0] or not turns[-1][1]:
            out.skipped += 1
            continue
        out.conversations.append(Conversation(turns, where))
    return out


def load_source(node: Any) -> Loaded:
    """Load a validated blend-source node: conversations, skipped count, files and hash.

    Raises:
        InputDataError: no files, malformed records, or no usable record at all.
    """
    loader = registry.get("blend-source", node.type).obj
    files = source_files(node.path)
    loaded = loader.load(node, files)
    loaded.files = [str(f) for f in files]
    loaded.sha256 = files_sha256(files)
    if not loaded.conversations:
        raise InputDataError(
            f"blend source `{node.type}` at {node.path!r} has no usable record "
            f"({loaded.skipped} skipped for an empty prompt or answer); remove it from "
            "instruct.blend or fix the data")
    return loaded


# ------------------------------------------------------------------------------ formats
registry.add_kind("blend-source", "A loader for one instruction-data format.")


@register("blend-source", "alpaca")
class Alpaca:
    """Alpaca JSON: an array of {instruction, input, output}."""

    class Config(InstructionInputOutput):
        pass

    @staticmethod
    def load(cfg: Config, files: list[Path]) -> Loaded:
        def turns(rec: Any, where: str):
            require(rec, where, "alpaca", "instruction", "output")
            return [cfg.render_fields(rec)]

        return collect(_records(files), turns)


@register("blend-source", "dolly")
class Dolly:
    """Instruction/response JSONL: {prompt, response} (prompt may be wrapped in the Alpaca
    "### Instruction: ... ### Response:" frame, which is removed) or Dolly-15k's
    {instruction, context, response}."""

    class Config(SourceConfig):
        FIELDS: ClassVar[tuple[str, ...]] = ("instruction", "context", "response")
        DEFAULT: ClassVar[tuple[str, str]] = ("{instruction}\n\n{context}", "{response}")

    @staticmethod
    def load(cfg: Config, files: list[Path]) -> Loaded:
        def turns(rec: Any, where: str):
            require(rec, where, "dolly", "response")
            if "instruction" not in rec:
                require(rec, where, "dolly", "prompt")
                rec = {"instruction": unwrap_alpaca_prompt(rec["prompt"]),
                       "response": rec["response"]}
            return [cfg.render_fields(rec)]

        return collect(jsonl_records(files), turns)


def unwrap_alpaca_prompt(prompt: str) -> str:
    """The instruction inside an Alpaca-framed prompt (the prompt itself if unframed)."""
    text = prompt
    if "### Instruction:" in text:
        text = text.split("### Instruction:", 1)[1]
    if "### Response:" in text:
        text = text.rsplit("### Response:", 1)[0]
    return text.replace("### Input:", "").strip()


@register("blend-source", "oasst")
class OpenAssistant:
    """OpenAssistant message trees (JSONL, one tree per line): the best-ranked path.

    From the root prompt, follow at each message the reply with the lowest `rank` (unranked
    replies come last, then file order), skipping deleted, synthetic and review-rejected
    messages; the path ends at the last assistant message."""

    class Config(SourceConfig):
        pass

    @staticmethod
    def load(cfg: Config, files: list[Path]) -> Loaded:
        def turns(rec: Any, where: str):
            require(rec, where, "oasst", "prompt")
            return best_path_turns(rec["prompt"], where)

        return collect(jsonl_records(files), turns)


def _usable(msg: dict) -> bool:
    return not msg.get("deleted") and not msg.get("synthetic") \
        and msg.get("review_result") is not False and bool(str(msg.get("text", "")).strip())


def best_path_turns(root: dict, where: str) -> list[tuple[str, str]] | None:
    """(prompter, assistant) pairs along the best-ranked path of one tree; None if unusable."""
    require(root, where, "oasst", "text", "role")
    if not _usable(root) or root["role"] != "prompter":
        return None
    path, msg = [root], root
    while True:
        replies = [r for r in msg.get("replies") or [] if _usable(r)]
        if not replies:
            break
        msg = min(enumerate(replies), key=lambda ir: (
            ir[1].get("rank") is None, ir[1].get("rank") or 0, ir[0]))[1]
        path.append(msg)
    if len(path) % 2:                      # ends on a prompter message: no answer to it
        path = path[:-1]
    roles = [m.get("role") for m in path]
    if not path or roles != ["prompter", "assistant"] * (len(path) // 2):
        return None
    return [(path[i]["text"].strip(), path[i + 1]["text"].strip())
            for i in range(0, len(path), 2)]


@register("blend-source", "flan-cot")
class FlanCoT:
    """FLAN v2 chain-of-thought TSV: question \\t answer \\t rationale, no header."""

    class Config(SourceConfig):
        FIELDS: ClassVar[tuple[str, ...]] = ("question", "answer", "rationale")
        DEFAULT: ClassVar[tuple[str, str]] = (
            "{question}\n\nLet's think step by step.", "{rationale}\nSo the answer is {answer}.")

    @staticmethod
    def load(cfg: Config, files: list[Path]) -> Loaded:
        def records():
            for f in files:
                with _open(f) as fh:
                    for i, line in enumerate(fh, 1):
                        if not line.strip():
                            continue
                        cols = line.rstrip("\n").split("\t")
                        if len(cols) != 3:
                            raise InputDataError(
                                f"{f}:{i}: flan-cot rows have 3 tab-separated columns "
                                f"(question, answer, rationale); this one has {len(cols)}")
                        yield f"{f}:{i}", dict(zip(cfg.FIELDS, cols))

        return collect(records(), lambda rec, where: [cfg.render_fields(rec)])


@register("blend-source", "p3")
class P3:
    """P3 / T0 prompted examples, JSONL {prompt, completion} (a trailing <|endoftext|> is
    dropped)."""

    class Config(SourceConfig):
        FIELDS: ClassVar[tuple[str, ...]] = ("prompt", "completion", "template")
        DEFAULT: ClassVar[tuple[str, str]] = ("{prompt}", "{completion}")

    @staticmethod
    def load(cfg: Config, files: list[Path]) -> Loaded:
        def turns(rec: Any, where: str):
            require(rec, where, "p3", "prompt", "completion")
            rec = {**rec, "completion": str(rec["completion"]).replace("<|endoftext|>", "")}
            return [cfg.render_fields(rec)]

        return collect(jsonl_records(files), turns)


@register("blend-source", "self-instruct")
class SelfInstruct:
    """Self-Instruct tasks, JSONL {instruction, instances: [{input, output}]}: one sample per
    instance (seed tasks and user-oriented instructions alike)."""

    class Config(InstructionInputOutput):
        pass

    @staticmethod
    def load(cfg: Config, files: list[Path]) -> Loaded:
        def instances():
            for where, rec in jsonl_records(files):
                require(rec, where, "self-instruct", "instruction", "instances")
                for j, inst in enumerate(rec["instances"] or []):
                    require(inst, f"{where} instances[{j}]", "self-instruct", "output")
                    yield f"{where} instances[{j}]", {"instruction": rec["instruction"], **inst}

        return collect(instances(),
                       lambda rec, where: [cfg.render_fields(rec)])


@register("blend-source", "lima")
class Lima:
    """LIMA conversations (LLaMA-Factory layout): a JSON array of {instruction, input, output,
    history}, `history` being earlier [user, assistant] pairs."""

    class Config(InstructionInputOutput):
        pass

    @staticmethod
    def load(cfg: Config, files: list[Path]) -> Loaded:
        def turns(rec: Any, where: str):
            require(rec, where, "lima", "instruction", "output")
            history = rec.get("history") or []
            if not all(isinstance(h, (list, tuple)) and len(h) == 2 for h in history):
                raise InputDataError(f"{where}: lima `history` must be a list of "
                                     "[user, assistant] pairs")
            return [(str(u).strip(), str(a).strip()) for u, a in history] + \
                [cfg.render_fields(rec)]

        return collect(_records(files), turns)


def _records(files: list[Path]) -> Iterator[tuple[str, Any]]:
    """Records of JSON-array files, or of JSONL files (by content, not by name)."""
    for f in files:
        with _open(f) as fh:
            head = fh.read(1024).lstrip()
        yield from (json_array_records([f]) if head.startswith("[") else jsonl_records([f]))

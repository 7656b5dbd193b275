"""What every corpus shares: the Document record, the read policies, and the validating scan.

A corpus is an ordered list of *sources* (files, or row ranges of a dataset); each source yields
documents in a fixed order. The global document order (sources in order, documents in order) is
what every downstream artifact indexes, so it must not depend on how the work is sharded.

`scan()` reads every record once *before* any tokenizing: it finds missing or empty files,
undecodable lines, unknown fields and empty documents, and counts documents per source so the
tokenize stage can split the corpus into shards of contiguous document ranges.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal, Optional

from pydantic import Field, model_serializer

from retro.platform.errors import InputDataError
from retro.platform.registry import StrictModel, registry


@dataclass(frozen=True)
class Document:
    """One document: the unit that chunks never cross and that neighbour exclusion bans."""

    doc_id: str
    title: str
    text: str


@dataclass
class ReadStats:
    """Records skipped while reading (only when the policy says `skip`)."""

    bad_records: int = 0
    """Lines that are not UTF-8 or not valid JSON (or unreadable files)."""
    empty_records: int = 0
    """Records whose text is empty or whitespace only."""
    first_bad: Optional[str] = None
    """`file:line: reason` of the first skipped record, for the log."""

    def add(self, other: "ReadStats") -> None:
        self.bad_records += other.bad_records
        self.empty_records += other.empty_records
        self.first_bad = self.first_bad or other.first_bad


@dataclass
class Scan:
    """Result of `Corpus.scan`: documents per source, after max_documents/fraction."""

    sources: list[Any]
    counts: list[int]
    stats: ReadStats = field(default_factory=ReadStats)

    @property
    def n_docs(self) -> int:
        return sum(self.counts)

    def shards(self, n_shards: int) -> list[list[tuple[Any, int, int]]]:
        """Split the global document range into `n_shards` contiguous pieces.

        Returns:
            One list per shard of `(source, first_doc, stop_doc)` pieces, in global order.
        """
        total = self.n_docs
        bounds = [round(i * total / n_shards) for i in range(n_shards + 1)]
        out: list[list[tuple[Any, int, int]]] = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            pieces, base = [], 0
            for source, count in zip(self.sources, self.counts):
                a, b = max(lo, base), min(hi, base + count)
                if a < b:
                    pieces.append((source, a - base, b - base))
                base += count
            if pieces:
                out.append(pieces)
        return out


class CorpusOptions(StrictModel):
    """Read policies every corpus kind shares."""

    max_documents: Optional[int] = Field(None, ge=1)
    """Use only the first N documents (in corpus order): small runs of big corpora."""
    max_documents_per_source: Optional[int] = Field(None, ge=1)
    """Use only the first N documents of each source (file): part of every file of a corpus
    of several (e.g. gold passages plus as many wiki passages). Applies before
    `max_documents` and `fraction`."""
    fraction: float = Field(1.0, gt=0, le=1)
    """Use only the first ceil(fraction x documents) documents (applied after a full count)."""
    on_bad_record: Literal["error", "skip"] = "error"
    """Lines that are not UTF-8 or not valid JSON: stop with file:line (`error`) or skip and count
    them in the tokens manifest (`skip`)."""
    on_empty: Literal["error", "skip"] = "error"
    """Records with empty text: stop with file:line (`error`) or skip and count them (`skip`)."""
    prepend_title: bool = False
    """Start each document with its title and a newline."""

    @model_serializer(mode="wrap")
    def _omit_unset_per_source(self, handler: Any) -> dict[str, Any]:
        # unset, it dumps as before the field existed, so stage keys of existing specs hold
        out = handler(self)
        if isinstance(out, dict) and out.get("max_documents_per_source") is None:
            out.pop("max_documents_per_source", None)
        return out


class BaseCorpus:
    """Shared machinery; subclasses implement `sources()` and `read(source, stats)`."""

    config: CorpusOptions

    def __init__(self, config: Any):
        self.config = config

    def __reduce__(self):  # configs are dynamic pydantic classes: ship the JSON, rebuild there

        return (registry.build, ("corpus", self.config.model_dump(mode="json")))

    # subclasses ------------------------------------------------------------------------------
    def sources(self) -> list[Any]:
        """The ordered sources; raises InputDataError when none exist."""
        raise NotImplementedError

    def read(self, source: Any, stats: ReadStats) -> Iterator[Document]:
        """Every document of `source`, applying the bad-record/empty policies."""
        raise NotImplementedError

    # shared ----------------------------------------------------------------------------------
    def documents(self, source: Any, start: int = 0, stop: Optional[int] = None,
                  stats: Optional[ReadStats] = None) -> Iterator[Document]:
        """Documents `[start, stop)` of one source (indices as counted by `scan`)."""
        stats = stats if stats is not None else ReadStats()
        for i, doc in enumerate(self.read(source, stats)):
            if stop is not None and i >= stop:
                return
            if i >= start:
                yield self._finish(doc)

    def iter_all(self, limit: Optional[int] = None) -> Iterator[Document]:
        """Documents in corpus order (max_documents applies; fraction is not: it needs a scan)."""
        cap = min(x for x in (limit, self.config.max_documents, math.inf) if x is not None)
        n = 0
        for source in self.sources():
            for doc in self.documents(source, stop=self.config.max_documents_per_source):
                if n >= cap:
                    return
                n += 1
                yield doc

    def scan(self, parallel_map: Optional[Callable[[Callable, list], list]] = None) -> Scan:
        """Validate every record that will be used and count documents per source.

        With `max_documents` the sources are read in order and reading stops once enough
        documents are found; otherwise every source is counted (in parallel when given a map).

        Raises:
            InputDataError: missing/empty files, undecodable lines, unknown fields, empty
                documents (under the `error` policies), or no documents at all.
        """
        sources = self.sources()
        stats = ReadStats()
        counts: list[int] = []
        per_source = self.config.max_documents_per_source
        if (self.config.max_documents is not None or per_source is not None) \
                and self.config.fraction == 1.0:
            remaining = self.config.max_documents or math.inf
            for source in sources:
                if remaining == 0:
                    break
                cap = min(remaining, per_source or math.inf)
                n = sum(1 for _ in itertools.islice(self.read(source, stats),
                                                    None if cap == math.inf else int(cap)))
                counts.append(n)
                remaining -= n
            sources = sources[:len(counts)]
        else:
            results = (parallel_map or _serial_map)(count_documents,
                                                    [(self, s) for s in sources])
            for n, s in results:
                counts.append(n)
                stats.add(s)
        counts = self._apply_limits(counts)
        if sum(counts) == 0:
            raise InputDataError(
                f"corpus {self.describe()} has no documents"
                + (f" (skipped {stats.bad_records} bad and {stats.empty_records} empty records)"
                   if stats.bad_records or stats.empty_records else "")
                + "; hint: check the paths and the text field")
        return Scan(sources, counts, stats)

    def describe(self) -> str:
        return type(self).__name__

    def _apply_limits(self, counts: list[int]) -> list[int]:
        if self.config.max_documents_per_source is not None:
            counts = [min(c, self.config.max_documents_per_source) for c in counts]
        keep = sum(counts)
        if self.config.fraction < 1.0:
            keep = math.ceil(self.config.fraction * keep)
        if self.config.max_documents is not None:
            keep = min(keep, self.config.max_documents)
        out = []
        for c in counts:
            out.append(min(c, keep))
            keep -= out[-1]
        return out

    def _finish(self, doc: Document) -> Document:
        if self.config.prepend_title and doc.title:
            return Document(doc.doc_id, doc.title, f"{doc.title}\n{doc.text}")
        return doc


def count_documents(job: tuple[BaseCorpus, Any]) -> tuple[int, ReadStats]:
    """Documents in one source (a module-level function, so it can run as a Ray task)."""
    corpus, source = job
    stats = ReadStats()
    n = sum(1 for _ in corpus.read(source, stats))
    return n, stats


def _serial_map(fn: Callable, items: Iterable) -> list:
    return [fn(x) for x in items]


def bad_record(stats: ReadStats, policy: str, where: str, reason: str, hint: str) -> None:
    """Apply the `error`/`skip` policy to one unreadable record."""
    if policy == "error":
        raise InputDataError(f"{where}: {reason}; hint: {hint}")
    stats.bad_records += 1
    stats.first_bad = stats.first_bad or f"{where}: {reason}"


def empty_record(stats: ReadStats, policy: str, where: str) -> None:
    """Apply the `error`/`skip` policy to one record with empty text."""
    if policy == "error":
        raise InputDataError(f"{where}: empty document text; hint: remove it, or set "
                             "`corpus.on_empty: skip` to skip and count empty documents")
    stats.empty_records += 1
    stats.first_bad = stats.first_bad or f"{where}: empty text"


def group_records(records: Iterable[tuple[str, Optional[dict], Optional[str]]],
                  config: Any, stats: ReadStats) -> Iterator[Document]:
    """Turn records into documents: consecutive records with the same doc id become one.

    Args:
        records: `(location, record or None, error reason or None)` in order.
        config: a config with text_field/title_field/id_field/doc_id_field/join_with and the
            read policies.
        stats: counts of skipped records (updated).

    Raises:
        InputDataError: the text field is missing (an unknown text field), or a policy says
            `error`.
    """
    cur_id, cur_title, parts = None, "", []
    for n, (where, rec, reason) in enumerate(records):
        if rec is None:
            bad_record(stats, config.on_bad_record, where, reason or "unreadable record",
                       "fix the file, or set `corpus.on_bad_record: skip` to skip and count "
                       "such lines")
            continue
        if config.text_field not in rec:
            raise InputDataError(
                f"{where}: no field {config.text_field!r} (corpus.text_field); the record has "
                f"fields {sorted(rec)}; hint: set `corpus.text_field` to one of them")
        text = rec[config.text_field]
        if not isinstance(text, str) or not text.strip():
            empty_record(stats, config.on_empty, where)
            continue
        doc_id = _field(rec, config.doc_id_field) or _field(rec, config.id_field) or where
        if parts and doc_id != cur_id:
            yield Document(cur_id, cur_title, config.join_with.join(parts))
            parts = []
        if not parts:
            cur_id, cur_title = doc_id, _field(rec, config.title_field) or ""
        parts.append(text)
        if config.doc_id_field is None:  # every record is its own document
            yield Document(cur_id, cur_title, text)
            parts = []
    if parts:
        yield Document(cur_id, cur_title, config.join_with.join(parts))


def _field(rec: dict, name: Optional[str]) -> Optional[str]:
    if name is None or rec.get(name) is None:
        return None
    return str(rec[name])

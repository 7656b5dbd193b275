"""JSON Lines corpora (plain or gzip), one record per line; the wiki_featured_passages format."""

from __future__ import annotations

import glob
import gzip
import json
from pathlib import Path
from typing import Iterator, Optional, Union

from pydantic import field_validator

from retro.components.corpora.base import BaseCorpus, CorpusOptions, Document, ReadStats, \
    bad_record, group_records
from retro.platform.errors import InputDataError
from retro.platform.registry import register
from retro.platform.spec.types import DataPath


class RecordFields(CorpusOptions):
    """Which record fields hold the text, title and ids."""

    text_field: str = "text"
    """Field holding the document text."""
    title_field: Optional[str] = "title"
    """Field holding the title (None: no titles)."""
    id_field: Optional[str] = "id"
    """Field holding a record id; the document id when `doc_id_field` is None or missing."""
    doc_id_field: Optional[str] = "doc_id"
    """Field naming the document a record belongs to: consecutive records with the same value
    are joined into one document (passages of one article). None: every record is a document."""
    join_with: str = " "
    """Separator placed between the records of one document."""


@register("corpus", "jsonl", default=True)
class JsonlCorpus(BaseCorpus):
    """JSON Lines files (.jsonl or .jsonl.gz), several files or globs, read in sorted order."""

    class Config(RecordFields):
        paths: list[DataPath]
        """Files or globs (e.g. `${env:RETRO_DATA,../shared/data}/wiki_featured_passages/*.gz`);
        globs expand in sorted order, files keep the order given."""

        @field_validator("paths", mode="before")
        @classmethod
        def _one_or_many(cls, value):
            return [value] if isinstance(value, str) else value

    def describe(self) -> str:
        return f"jsonl {self.config.paths}"

    def sources(self) -> list[str]:
        """Expanded file list.

        Raises:
            InputDataError: a path is missing, a glob matches nothing, or a file is empty.
        """
        files: list[str] = []
        for i, pattern in enumerate(self.config.paths):
            if any(ch in pattern for ch in "*?["):
                matched = sorted(glob.glob(pattern, recursive=True))
                if not matched:
                    raise InputDataError(f"corpus.paths.{i}: glob {pattern!r} matches no file; "
                                         "hint: check the path or RETRO_DATA")
            elif not Path(pattern).is_file():
                raise InputDataError(f"corpus.paths.{i}: file {pattern!r} does not exist; "
                                     "hint: check the path or RETRO_DATA")
            else:
                matched = [pattern]
            files += matched
        for f in files:
            if Path(f).stat().st_size == 0:
                raise InputDataError(f"corpus file {f} is empty; hint: remove it from "
                                     "corpus.paths")
        return files

    def read(self, source: str, stats: ReadStats) -> Iterator[Document]:
        return group_records(_records(source, self.config, stats), self.config, stats)


def _records(path: str, config: RecordFields, stats: ReadStats):
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            for line_no, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    rec: Union[dict, None] = json.loads(raw.decode("utf-8"))
                    reason = None if isinstance(rec, dict) else "not a JSON object"
                except UnicodeDecodeError as e:
                    rec, reason = None, f"not valid UTF-8 ({e.reason} at byte {e.start})"
                except json.JSONDecodeError as e:
                    rec, reason = None, f"not valid JSON ({e.msg})"
                yield where, (rec if reason is None else None), reason
    except (OSError, EOFError) as e:  # truncated or corrupt gzip
        bad_record(stats, config.on_bad_record, path, f"unreadable file ({e})",
                   "re-download the file, or set `corpus.on_bad_record: skip`")

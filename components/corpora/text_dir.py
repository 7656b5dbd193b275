"""A directory of text files, one document per file."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from pydantic import Field

from retro.components.corpora.base import BaseCorpus, CorpusOptions, Document, ReadStats, \
    bad_record, empty_record
from retro.platform.errors import InputDataError
from retro.platform.registry import register
from retro.platform.spec.types import DataPath

_FILES_PER_SOURCE = 1000  # a source is a run of files, so scanning parallelises


@register("corpus", "text-dir")
class TextDirCorpus(BaseCorpus):
    """Every file matching `pattern` under `path` is one document (id: relative path,
    title: file stem), in sorted path order."""

    class Config(CorpusOptions):
        path: DataPath
        """Directory holding the documents."""
        pattern: str = "**/*.txt"
        """Glob (relative to `path`) selecting the files."""
        files_per_source: int = Field(_FILES_PER_SOURCE, ge=1)
        """Files per scan/shard unit (execution detail; does not change the output)."""

        def data_files(self) -> dict[str, tuple[str, ...]]:
            """Only the files `pattern` selects enter stage keys."""
            return {"path": (self.pattern,)}

    def describe(self) -> str:
        return f"text-dir {self.config.path}"

    def sources(self) -> list[tuple[str, ...]]:
        root = Path(self.config.path)
        if not root.is_dir():
            raise InputDataError(f"corpus.path: directory {str(root)!r} does not exist; "
                                 "hint: check the path or RETRO_DATA")
        files = sorted(str(p.relative_to(root)) for p in root.glob(self.config.pattern)
                       if p.is_file())
        if not files:
            raise InputDataError(f"corpus.path: no file under {root} matches "
                                 f"{self.config.pattern!r}; hint: set corpus.pattern")
        k = self.config.files_per_source
        return [tuple(files[i:i + k]) for i in range(0, len(files), k)]

    def read(self, source: tuple[str, ...], stats: ReadStats) -> Iterator[Document]:
        root = Path(self.config.path)
        for rel in source:
            where = str(root / rel)
            try:
                text = (root / rel).read_bytes().decode("utf-8")
            except UnicodeDecodeError as e:
                bad_record(stats, self.config.on_bad_record, where,
                           f"not valid UTF-8 ({e.reason} at byte {e.start})",
                           "re-encode the file, or set `corpus.on_bad_record: skip`")
                continue
            if not text.strip():
                empty_record(stats, self.config.on_empty, where)
                continue
            yield Document(rel, Path(rel).stem, text)

"""A Hugging Face `datasets` dataset saved with `save_to_disk` (memory-mapped Arrow)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

from pydantic import Field

from retro.components.corpora.base import Document, ReadStats, group_records
from retro.components.corpora.base import BaseCorpus
from retro.components.corpora.jsonl import RecordFields
from retro.platform.errors import InputDataError
from retro.platform.registry import register
from retro.platform.spec.types import DataPath


@register("corpus", "hf-disk")
class HFDiskCorpus(BaseCorpus):
    """Rows of a dataset loaded with `datasets.load_from_disk`; fields as in `jsonl`."""

    class Config(RecordFields):
        path: DataPath
        """Directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
        split: Optional[str] = None
        """Split to read when the directory holds a DatasetDict (e.g. `train`)."""
        rows_per_source: int = Field(50_000, ge=1)
        """Rows per scan/shard unit (execution detail; does not change the output)."""

    def describe(self) -> str:
        return f"hf-disk {self.config.path}"

    def _dataset(self):
        import datasets

        if not Path(self.config.path).is_dir():
            raise InputDataError(f"corpus.path: {self.config.path!r} is not a directory; "
                                 "hint: point it at a `save_to_disk` folder")
        try:
            ds = datasets.load_from_disk(self.config.path)
        except FileNotFoundError as e:
            raise InputDataError(f"corpus.path: {self.config.path} is not a saved dataset "
                                 f"({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if self.config.split not in ds:
                raise InputDataError(f"corpus.split: {self.config.split!r} is not a split of "
                                     f"{self.config.path}; splits: {sorted(ds)}")
            ds = ds[self.config.split]
        if self.config.text_field not in ds.column_names:
            raise InputDataError(f"corpus.text_field: {self.config.text_field!r} is not a column "
                                 f"of {self.config.path}; columns: {ds.column_names}")
        return ds

    def sources(self) -> list[tuple[int, int]]:
        n = len(self._dataset())
        if n == 0:
            raise InputDataError(f"corpus.path: dataset {self.config.path} has no rows")
        k = self.config.rows_per_source
        return [(a, min(a + k, n)) for a in range(0, n, k)]

    def read(self, source: tuple[int, int], stats: ReadStats) -> Iterator[Document]:
        ds = self._dataset()
        lo, hi = _snap(ds, *source, self.config.doc_id_field)

        def records():
            for a in range(lo, hi, 1000):
                batch = ds[a:min(a + 1000, hi)]
                cols = list(batch)
                for j in range(len(batch[cols[0]])):
                    yield f"{self.config.path}[row {a + j}]", {c: batch[c][j] for c in cols}, None

        return group_records(records(), self.config, stats)


def _snap(ds, lo: int, hi: int, field: Optional[str]) -> tuple[int, int]:
    """Move a row range's ends to document boundaries, so no document is split in two."""
    if field is None:
        return lo, hi
    column = ds.select_columns([field])

    def same(i: int) -> bool:
        return 0 < i < len(ds) and column[i][field] == column[i - 1][field]

    while lo < hi and same(lo):
        lo += 1
    while same(hi):
        hi += 1
    return lo, hi

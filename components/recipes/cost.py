"""Back-of-envelope training cost for `retro plan`: FLOPs -> GPU-hours, assumptions printed.

Training FLOPs = 6 * N * D (forward + backward, Kaplan et al. 2020) with N the parameters that
take part in the forward pass and D the tokens processed. Retro's encoder runs over k neighbours
of r tokens per chunk of m tokens, i.e. k * r / m extra encoder tokens per decoder token; its
FLOPs are added as 6 * N_encoder * D * k * r / m. Wall time assumes a sustained fraction (MFU)
of the GPU's dense bf16 peak.
"""

from __future__ import annotations

from dataclasses import dataclass
from retro.components.models.retro.presets import ALIASES

GPU_PEAK_BF16 = {"A100": 312e12, "H100": 989e12}


@dataclass(frozen=True)
class CostAssumption:
    gpu: str = "A100"
    mfu: float = 0.40
    """Model FLOPs utilisation: the share of peak a large Megatron-style run sustains."""

    def text(self) -> str:
        return (f"6*N*D FLOPs, {self.gpu} bf16 peak {GPU_PEAK_BF16[self.gpu] / 1e12:.0f} "
                f"TFLOP/s at {self.mfu:.0%} MFU")


def training_flops(decoder_params: float, tokens: float, encoder_params: float = 0.0,
                   neighbours: int = 0, retrieved_length: int = 0, chunk_length: int = 64
                   ) -> float:
    """FLOPs of one training pass over `tokens` tokens (see module docstring)."""
    flops = 6.0 * decoder_params * tokens
    if encoder_params and neighbours and retrieved_length:
        flops += 6.0 * encoder_params * tokens * neighbours * retrieved_length / chunk_length
    return flops


def gpu_hours(flops: float, assumption: CostAssumption = CostAssumption()) -> float:
    return flops / (GPU_PEAK_BF16[assumption.gpu] * assumption.mfu) / 3600.0


# InstructRetro Table 5: A100 GPU-hours of continued pretraining on 100B tokens (REFERENCE §3).
PAPER_FIT_GPU_HOURS = {
    "instructretro-823m": (1_920, 1_408), "instructretro-2.25b": (4_096, 3_226),
    "instructretro-8.5b": (17_325, 12_698), "instructretro-22b": (52_152, 37_888),
    "instructretro-43b": (69_995, 53_329),
}
"""preset -> (Retro-fitting, GPT-fitting) GPU-hours reported by the paper."""


def paper_fit_hours(preset: str | None, retro: bool) -> str | None:
    """The paper's measured GPU-hours for this preset's 100B-token fit, as text, if known."""

    hours = PAPER_FIT_GPU_HOURS.get(ALIASES.get(preset or "", preset or ""))
    if hours is None:
        return None
    return f"{hours[0 if retro else 1]:,} A100 GPU-h (InstructRetro Table 5, 100B tokens)"

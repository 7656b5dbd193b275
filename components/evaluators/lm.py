"""Loading a model artifact for evaluation and running it: scoring and greedy generation.

A model directory is either a Retro checkpoint (`retro_config.json`, loaded as
`RetroForCausalLM`; `retro: false` ones are the GPT baseline) or a plain transformers causal
LM (e.g. the imported SmolLM2). Evaluators see one `EvalLM` either way. torch and transformers
are imported inside functions only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from retro.components.devices import module_device

from retro.components.models.retro.layout import RETRO_CONFIG
from retro.platform.errors import InputDataError


@dataclass
class EvalLM:
    """A loaded model plus what the evaluators need to know about it."""

    model: Any
    tokenizer: Any
    is_retro: bool            # has an encoder + CCA (RetroForCausalLM with retro: true)
    chunk_length: int
    path: Path

    def set_gate(self, gate: Optional[float]) -> None:
        """Override the CCA gate (0 bypasses the encoder); None keeps the checkpoint's."""
        if gate is not None and hasattr(self.model, "gate"):
            self.model.gate = float(gate)


def find_model_dir(root: Path) -> Path:
    """The model inside an artifact: the root, or the one sub-folder holding a config."""
    for cand in [root, *(p for p in sorted(root.iterdir()) if p.is_dir())]:
        if (cand / RETRO_CONFIG).exists() or (cand / "config.json").exists():
            return cand
    raise InputDataError(f"no model in {root}: expected {RETRO_CONFIG} or a transformers "
                         "config.json (a Retro checkpoint or an imported HF model)")


def find_tokenizer_dir(*roots: Path) -> Path:
    """First folder (or sub-folder) holding tokenizer files."""
    for root in roots:
        if root is None:
            continue
        for cand in [root, *(p for p in sorted(Path(root).rglob("*")) if p.is_dir())]:
            if (cand / "tokenizer.json").exists() or (cand / "tokenizer_config.json").exists():
                return cand
    raise InputDataError(f"no tokenizer files (tokenizer.json) in {', '.join(map(str, roots))}; "
                         "give the evaluator a `tokenizer` input or save one with the model")


def load_eval_lm(model_root: Path, tokenizer_root: Path | None = None,
                 threads: int | None = None, device: str = "cpu") -> EvalLM:
    """Load a model artifact (Retro or plain HF) and its tokenizer, in eval mode, on `device`
    (a stage's `retro.components.devices.stage_device`; CPU by default).

    A plain transformers model is wrapped in a `RetroForCausalLM` with `retro: false` (no
    encoder), so every model runs through the same forward and `generate`.

    Args:
        model_root: the model artifact folder.
        tokenizer_root: where to look for the tokenizer first (default: the model folder).
        threads: torch intra-op threads (None: leave torch's default).
        device: "cpu" or "cuda"; `token_nll` and `generate` move their inputs to it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from retro.components.models.retro import RetroConfig, RetroForCausalLM

    if threads:
        torch.set_num_threads(threads)
    model_dir = find_model_dir(Path(model_root))
    tok_dir = find_tokenizer_dir(*(r for r in (tokenizer_root, model_root) if r is not None))
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    if (model_dir / RETRO_CONFIG).exists():
        model = RetroForCausalLM.from_pretrained(model_dir)
    else:
        decoder = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                       attn_implementation="sdpa")
        model = RetroForCausalLM(RetroConfig(decoder=decoder.config.to_dict(), retro=False),
                                 decoder=decoder)
    model.to(device).eval()
    return EvalLM(model, tokenizer, model.encoder is not None,
                  int(model.config.chunk_length), model_dir)


def token_nll(lm: EvalLM, input_ids: Any, labels: Any, neighbours: Any = None) -> Any:
    """Per-position negative log-likelihood [b, n] (float64, on CPU) of `labels` (< 0: not
    scored); the inputs are moved to the model's device."""
    import torch
    import torch.nn.functional as F

    device = module_device(lm.model)
    labels = labels.to(device)
    with torch.inference_mode():
        logits = lm.model(input_ids.to(device), neighbours=None if neighbours is None
                          else neighbours.to(device)).logits
        nll = F.cross_entropy(logits.float().flatten(0, 1), labels.clamp(min=0).flatten(),
                              reduction="none").view_as(labels).double()
    return (nll * (labels >= 0)).cpu()


def greedy_generate(lm: EvalLM, prompt_ids: Sequence[int], max_new_tokens: int,
                    stop_sequences: Sequence[str],
                    retrieve: Optional[Callable[[str], Any]] = None) -> str:
    """Greedy continuation of `prompt_ids`, cut before the first stop sequence.

    Args:
        lm: the model.
        prompt_ids: prompt token ids.
        max_new_tokens: generation budget.
        stop_sequences: strings that end the answer (not included).
        retrieve: Retro only: `retrieve(chunk_text) -> [k, r]` neighbour ids for each completed
            chunk (None, gate 0 or no encoder: the decoder alone, with a KV cache).
    """
    from retro.components.models.retro import generate

    out = generate(lm.model, lm.tokenizer, list(prompt_ids), max_new_tokens,
                   list(stop_sequences), retrieve=retrieve)
    return out.text

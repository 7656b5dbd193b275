"""Compute precision: which dtype a stage's matmuls run in, decided in one place.

A spec asks for `auto` (the default), `bf16` or `fp32`; `resolve_precision` turns that into
what the stage runs in on this device:

- `auto`: bf16 where the hardware computes it fast - CPUs with AMX (`amx_bf16`) or
  AVX512-BF16 (`avx512_bf16`) and CUDA GPUs of compute capability >= 8.0 - else fp32.
- `bf16` / `fp32`: forced. bf16 on hardware without fast bf16 still runs in bf16 (emulated,
  slow) with a warning in the stage log, never a silent fp32.

bf16 means autocast: weights, gradients, optimizer state and the loss stay fp32; matmuls and
convolutions run in bf16. torch is imported inside functions only.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, Literal, Optional

Precision = Literal["auto", "bf16", "fp32"]
"""What a spec asks for (part of the stage's key)."""
Resolved = Literal["bf16", "fp32"]
"""What a stage runs in (reported in the manifest and `retro plan`)."""

PRECISION_DOC = ("Compute precision: `auto` (bf16 compute where the hardware computes bf16 "
                 "fast: AMX / AVX512-BF16 CPUs, CUDA compute capability >= 8.0; else fp32), "
                 "`bf16` or `fp32` (forced). Master weights, optimizer state and losses stay "
                 "fp32. "
                 "`auto` artifacts differ across machines: pin it when that matters "
                 "(docs/precision.md).")

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = Path("/proc/cpuinfo")

Probe = Callable[[str], bool]
"""device type ("cpu" / "cuda") -> whether it computes bf16 fast."""


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The fast-bf16 flags (`amx_bf16`, `avx512_bf16`) in /proc/cpuinfo's flags (or `cpuinfo`)."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:          # not Linux: no fast bf16 known
            return []
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags") and ":" in line:
            flags.update(line.split(":", 1)[1].split())
    return [f for f in CPU_BF16_FLAGS if f in flags]


def cuda_capability() -> Optional[tuple[int, int]]:
    """The current CUDA device's compute capability, None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability())


def hardware_probe(device: str) -> bool:
    """The default probe: the CPU's flags, or the GPU's compute capability (>= 8.0)."""
    if device == "cuda":
        cap = cuda_capability()
        return cap is not None and cap >= (8, 0)
    return bool(cpu_bf16_flags())


def hardware_text(device: str) -> str:
    """What the default probe saw, for logs: `cpu avx512_bf16`, `cuda sm_80`, `cpu (none)`."""
    if device == "cuda":
        cap = cuda_capability()
        return f"cuda sm_{cap[0]}{cap[1]}" if cap else "cuda (none)"
    return "cpu " + (",".join(cpu_bf16_flags()) or "(no amx_bf16/avx512_bf16)")


def resolve_precision(requested: str, device: Any = "cpu", probe: Probe | None = None,
                      log: logging.Logger | None = None) -> Resolved:
    """`auto` / `bf16` / `fp32` -> what to run in on `device` (a torch.device or its type).

    Args:
        requested: the spec's value.
        device: where the stage computes.
        probe: device type -> fast bf16? (default: `hardware_probe`; tests simulate hardware).
        log: where the warning for bf16 on hardware without fast bf16 goes (the stage log).
    """
    if requested not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, not {requested!r}")
    kind = _kind(device)
    fast = (probe or hardware_probe)(kind)
    warning = precision_warning(requested, kind, probe)
    if warning:
        (log or logging.getLogger("retro.precision")).warning(warning)
    if requested == "auto":
        return "bf16" if fast else "fp32"
    return requested  # type: ignore[return-value]


def precision_warning(requested: str, device: Any = "cpu",
                      probe: Probe | None = None) -> str | None:
    """The warning for a forced bf16 on hardware without fast bf16 (None otherwise)."""
    kind = _kind(device)
    if requested != "bf16" or (probe or hardware_probe)(kind):
        return None
    return (f"precision: bf16 was asked but this {kind} has no fast bf16 (no amx_bf16 / "
            "avx512_bf16 CPU flag, or a GPU below compute capability 8.0): running bf16 "
            "emulated, likely slower than fp32; set precision: auto or fp32 to run fp32 here")


def _kind(device: Any) -> str:
    return getattr(device, "type", None) or str(device).split(":")[0]


def autocast(precision: str, device: Any = "cpu") -> Any:
    """A context that runs matmuls in bf16 when `precision` (resolved) is bf16, else nothing.

    Under it, parameters stay in their own dtype (fp32 master weights); outputs of autocast
    ops are bf16, so callers cast logits to fp32 before the loss."""
    if precision != "bf16":
        return contextlib.nullcontext()
    import torch

    return torch.autocast(_kind(device), dtype=torch.bfloat16)


def inference_autocast(model: Any, precision: str, device: Any = "cpu") -> Any:
    """`autocast` for a model that only runs inference: under bf16, every `nn.Linear` first
    gets bf16 copies of its weight and bias (once), and attention runs in fp32 on CPU; then the
    usual autocast context.

    Autocast would cast the same fp32 weights to the same bf16 values on every call; on a
    KV-cached decode step (one token) those casts are most of the step, and the bf16 CPU
    attention kernel is several times slower than fp32 at one query (models/retro/
    attention.py): 24 new tokens of SmolLM2-135M ran slower under plain autocast than in fp32.
    The Linear results equal plain autocast's (same bf16 operands; tested). Embeddings, norms
    and buffers (rotary frequencies) stay fp32, and a head tied to the input embedding gets its
    own bf16 copy, so the residual stream stays fp32 as under plain autocast. Never use it on
    a model that trains or is saved afterwards."""
    if precision == "bf16":
        from retro.components.models.retro.attention import use_fp32_cpu_attention

        bf16_linear_weights(model)
        use_fp32_cpu_attention(model)
    return autocast(precision, device)


def bf16_linear_weights(model: Any) -> int:
    """Replace each fp32 `nn.Linear` weight/bias of `model` by a frozen bf16 copy; returns
    how many layers changed (0 on a second call)."""
    import torch

    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.dtype == torch.float32:
            module.weight = torch.nn.Parameter(module.weight.detach().to(torch.bfloat16),
                                               requires_grad=False)
            if module.bias is not None:
                module.bias = torch.nn.Parameter(module.bias.detach().to(torch.bfloat16),
                                                 requires_grad=False)
            changed += 1
    return changed


def plan_text(requested: str, probe: Probe | None = None) -> str:
    """`retro plan`'s precision entry: `auto→bf16` as this machine's CPU resolves it (a GPU
    worker resolves on its own device), or the forced value."""
    if requested != "auto":
        return requested
    return f"auto→{'bf16' if (probe or hardware_probe)('cpu') else 'fp32'} (cpu here)"


def report_precision(ctx: Any, row: dict[str, Any]) -> None:
    """Record what a stage ran in: the manifest's `precision` (and `precision_requested`), a
    line in the stage log, and the bf16-without-hardware warning when there is one.

    Args:
        ctx: the StageContext.
        row: {requested, precision, hardware, warning?}.
    """
    ctx.summary["precision"] = row["precision"]
    ctx.summary["precision_requested"] = row["requested"]
    ctx.log.info("precision %s -> %s (%s)", row["requested"], row["precision"],
                 row.get("hardware", "?"))
    if row.get("warning"):
        ctx.log.warning(row["warning"])


def stage_precision(ctx: Any, requested: str, device: Any = "cpu",
                    probe: Probe | None = None) -> Resolved:
    """Resolve `requested` for a stage computing in this process and report it (see
    `report_precision`); returns the resolved precision."""
    kind = _kind(device)
    resolved = resolve_precision(requested, kind, probe, log=ctx.log)   # logs the warning
    report_precision(ctx, {"requested": requested, "precision": resolved,
                           "hardware": hardware_text(kind) if probe is None else "simulated"})
    return resolved


def precision_info(params: Any, *path: str) -> dict[str, str]:
    """A stage estimate's precision entry (`retro plan`'s info column): the `precision` field
    of the node at `path` in the stage's params (a dict or a params model); {} when the
    params have no such node (e.g. a BM25 retriever has no embedder)."""
    node = params
    for name in path:
        node = node.get(name) if isinstance(node, dict) else getattr(node, name, None)
        if node is None:
            return {}
    value = node.get("precision") if isinstance(node, dict) else getattr(node, "precision", None)
    return {"precision": plan_text(value or "auto")}


def report_shard_precision(ctx: Any, results: list[dict[str, Any]],
                           requested: str | None = None) -> None:
    """Report the precision shards ran in, from their results' `precision`, `requested` and
    `device` (shards a resumed run skipped have none): the first computing shard's, else
    `requested` resolved here; nothing when no model ran and `requested` is None."""
    ran = [r for r in results if r.get("precision")]
    requested = requested or (ran[0].get("requested") if ran else None)
    if requested is None:
        return
    device = ran[0].get("device", "cpu") if ran else "cpu"
    resolved = resolve_precision(requested, device, log=ctx.log)
    if ran and ran[0]["precision"] != resolved:      # shards saw other hardware than us
        resolved = ran[0]["precision"]
    report_precision(ctx, {"requested": requested, "precision": resolved,
                           "hardware": hardware_text(_kind(device))})

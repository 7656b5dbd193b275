"""Per-device training memory before launch: parameters, gradients, optimizer state,
activations and FSDP buffers, from the meta-device model and the stage's resources.

Pure arithmetic over a `ModelShape` (read off the model built on the meta device, so nothing is
allocated) and a `Workload` (sequence length, micro-batch, precision, workers, sharding,
activation checkpointing). `retro plan` shows the result per training stage and marks the
stages that will not fit their declared device memory, with the fix.

State (per parameter; AdamW with fp32 master weights, as the loop trains):
    fp32 weights 4 B, fp32 gradients 4 B (trainable only), AdamW's two fp32 moments 8 B
    (trainable only). FSDP divides all three by the workers; DDP replicates them and adds
    its fp32 gradient buckets (4 B per trainable parameter). bf16 compute without FSDP adds
    the bf16 parameter copy (2 B) and a micro-batch's bf16 gradients (2 B per trainable).

FSDP buffers (FSDP2, one unit unsharded at a time, the next prefetched): 2 x the largest
unit in the gather dtype, plus that unit's unsharded fp32 gradients before the
reduce-scatter; the root unit (embeddings, head, and whatever `fully_shard` units leave
over) stays gathered through forward and backward and holds unsharded fp32 gradients at the
end of backward.

Activations per layer follow Korthikanti et al. 2022, "Reducing Activation Recomputation in
Large Transformer Models" (arXiv:2205.05198), §4.1: the tensors each op saves for backward,
counted per element at the compute width `e` bytes (their `34·s·b·h + 5·a·s²·b` is the
e = 2, GELU 4h-MLP, dropout-everywhere case), generalised to a SwiGLU MLP of any width, to
grouped-query K/V and to SDPA / flash attention (no s² score matrix saved; its output is).
Retro's encoder and chunked cross-attention are counted the same way over their own token
counts: the encoder runs on b·(s/m)·k·r neighbour tokens, and each CCA layer's keys/values
are that many. Full activation checkpointing keeps only each block's input (their §4.2
"full recomputation": 2·s·b·h at e = 2) plus one block recomputed during backward; the
encoder's sub-blocks (self-attention, cross-attention, MLP) are checkpointed one by one (the
loop does so whenever checkpointing is on), so what is rebuilt at a time is the largest
decoder block or encoder sub-block.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

GiB = 2**30

DEVICES_GB = {"a100-40g": 40.0, "a100-80g": 80.0, "h100-80g": 79.6, "h200-141g": 140.4,
              "l40s-48g": 45.0, "a10g-24g": 22.5}
"""Device name -> total memory in GiB as the driver reports it (nvidia-smi's MiB / 1024: an
"80 GB" H100 has 81,559 MiB = 79.6 GiB, a "141 GB" H200 143,771 MiB = 140.4 GiB; the names
round), for `resources.*.device`."""

RESERVE_FRACTION = 0.05
RESERVE_MIN_GB = 1.5
"""What a stage cannot plan into: max(5%, 1.5 GiB) of the device, for the CUDA context,
cuBLAS / NCCL workspaces (about 1-1.5 GiB together) and the caching allocator's fragmentation
(memory reserved in blocks that no tensor fills). A plan at 99% of the device is an OOM."""


def usable_bytes(device_total: float) -> float:
    """Of a device's total bytes, what tensors can plan on (see RESERVE_FRACTION)."""
    return device_total - max(RESERVE_FRACTION * device_total, RESERVE_MIN_GB * GiB)


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on, read off the (meta-device) model."""

    params: int
    trainable: int
    root_params: int          # not inside any FSDP unit: gathered for the whole step
    root_trainable: int
    largest_unit: int         # params of the largest FSDP unit
    n_layers: int
    d: int
    heads: int
    kv_dim: int               # width of K (and V) projections (heads x head_dim, or GQA's)
    ffn: int
    gated: bool               # SwiGLU (llama family) vs GELU (gpt2)
    vocab: int
    dropout: bool             # dropout masks are saved (1 byte per element)
    cca_layers: int = 0
    encoder_layers: int = 0
    chunk_length: int = 64
    norm_saves: int = 1       # tensors a norm saves besides its output: LayerNorm's fused
                              # kernel its input (1); transformers' RMSNorm input and the
                              # normalised tensor before the weight (2)


@dataclass(frozen=True)
class Workload:
    """One training stage's execution: per worker."""

    seq: int
    micro_batch: int
    compute_bytes: int = 2     # 2: bf16 compute (and gathers), 4: fp32
    workers: int = 1
    fsdp: bool = False
    checkpoint_every: int = 0  # activation checkpointing: 0 off, 1 every block, N every N-th
    neighbours: int = 0        # k per chunk fed to the encoder (0: no retrieval)
    retrieved: int = 0         # r: tokens per neighbour (neighbour + continuation, 2m)
    flash: bool = True         # SDPA saves no s x s score matrix


@dataclass(frozen=True)
class MemoryEstimate:
    params: float
    grads: float
    optimizer: float
    buffers: float            # FSDP gathers / DDP buckets
    activations: float
    activations_no_ckpt: float
    activations_full_ckpt: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.buffers + self.activations

    def as_gib(self) -> dict[str, float]:
        return {k: v / GiB for k, v in asdict(self).items()} | {"total": self.total / GiB}


# ------------------------------------------------------------------------------ activations
def _attention(e: int, tq: float, tk: float, h: int, kv: int, heads: int, norm: int,
               k_len: int, drop: bool, flash: bool, cross: bool) -> float:
    """Saved bytes of one pre-norm attention sub-block (norm, QKV, SDPA, out-proj, dropout)
    with `tq` query tokens and `tk` key tokens in all; each query sees `k_len` keys."""
    saved = e * tq * h * (norm + 1)           # norm's saved tensors, projection input
    saved += e * tq * h + e * tk * 2 * kv     # Q, K, V
    saved += e * tq * h                       # o_proj input
    if flash:                                 # flash / memory-efficient SDPA saves its output
        saved += e * tq * h
    else:                                     # softmax output, its dropout mask and output
        saved += (e + (1 + e if drop else 0)) * heads * tq * k_len
    if drop:
        saved += tq * h                       # residual dropout mask
    if cross:
        saved += e * tq * h                   # the sliced / padded query copy
    return saved


def _mlp(e: int, t: float, h: int, ffn: int, gated: bool, drop: bool, norm: int) -> float:
    saved = e * t * h * (norm + 1)            # norm's saved tensors, up/gate input
    saved += e * t * ffn * (4 if gated else 2)  # SwiGLU: gate, silu, up, product; GELU: in, out
    return saved + (t * h if drop else 0)


def layer_activations(m: ModelShape, w: Workload, with_cca: bool) -> float:
    """Saved bytes of one decoder layer (its CCA included when it has one)."""
    e, t, h = w.compute_bytes, w.micro_batch * w.seq, m.d
    out = _attention(e, t, t, h, m.kv_dim, m.heads, m.norm_saves, w.seq, m.dropout, w.flash,
                     False)
    out += _mlp(e, t, h, m.ffn, m.gated, m.dropout, m.norm_saves)
    if with_cca and w.neighbours:
        t_enc = _encoder_tokens(m, w)
        out += _attention(e, t, t_enc, h, m.kv_dim, m.heads, m.norm_saves,
                          w.neighbours * w.retrieved, m.dropout, w.flash, True)
    return out


def _encoder_tokens(m: ModelShape, w: Workload) -> float:
    return w.micro_batch * (w.seq // m.chunk_length) * w.neighbours * w.retrieved


def _retrieves(m: ModelShape, w: Workload) -> bool:
    return bool(w.neighbours and m.encoder_layers and m.cca_layers)


def encoder_sub_blocks(m: ModelShape, w: Workload, first: bool) -> list[float]:
    """Saved bytes of one encoder layer's sub-blocks: self-attention within each neighbour,
    (the first layer) cross-attention to the chunk's m decoder states, MLP."""
    e, h, r = w.compute_bytes, m.d, w.retrieved
    t_enc, t = _encoder_tokens(m, w), w.micro_batch * w.seq
    out = [_attention(e, t_enc, t_enc, h, m.kv_dim, m.heads, m.norm_saves, r, m.dropout,
                      w.flash, False)]
    if first:
        out.append(_attention(e, t_enc, t, h, m.kv_dim, m.heads, m.norm_saves, m.chunk_length,
                              m.dropout, w.flash, False))
    return out + [_mlp(e, t_enc, h, m.ffn, m.gated, m.dropout, m.norm_saves)]


def encoder_layer_activations(m: ModelShape, w: Workload, first: bool) -> float:
    """Saved bytes of one encoder layer (its sub-blocks together)."""
    return sum(encoder_sub_blocks(m, w, first))


def encoder_activations(m: ModelShape, w: Workload) -> float:
    """The Retro encoder: embeddings of b·l·k·r neighbour tokens through its layers, then its
    final norm. Under activation checkpointing each sub-block keeps its input only (the
    first's is the neighbour embeddings), plus the final norm's input and the encoder output
    the CCA blocks take; the sub-block being recomputed is counted in `activations`."""
    if not _retrieves(m, w):
        return 0.0
    per_token = w.compute_bytes * _encoder_tokens(m, w) * m.d
    if w.checkpoint_every:
        return per_token * (2 * m.encoder_layers + 1 + 2)
    out = per_token * 2                       # neighbour embeddings, final norm input
    return out + sum(encoder_layer_activations(m, w, i == 0) for i in range(m.encoder_layers))


def head_activations(m: ModelShape, w: Workload) -> float:
    """Embeddings output, final norm, logits, their fp32 upcast for the loss, the saved
    log-softmax, and the logits' gradient (live at the start of backward)."""
    e, t = w.compute_bytes, w.micro_batch * w.seq
    upcast = 4 if e != 4 else 0               # `logits.float()` is a copy only below fp32
    return e * t * m.d * (2 + m.norm_saves) + t * m.vocab * (e + upcast + 4 + 4)


def activations(m: ModelShape, w: Workload) -> float:
    """Peak saved activations of one micro-batch: at backward's start without checkpointing;
    with it, the largest of backward's phases (the head with everything kept; each
    checkpointed block rebuilt on top of what the blocks before it keep; an encoder sub-block
    rebuilt on top of what the encoder and the blocks up to the first CCA keep), since
    backward frees each block's tensors once it has passed it."""
    cca = _cca_positions(m)
    layers = [layer_activations(m, w, i in cca) for i in range(1, m.n_layers + 1)]
    enc, head = encoder_activations(m, w), head_activations(m, w)
    if not w.checkpoint_every:
        return sum(layers) + enc + head
    block_input = w.compute_bytes * w.micro_batch * w.seq * m.d
    ckpt = {i for i in range(1, m.n_layers + 1) if (i - 1) % w.checkpoint_every == 0}
    stored = [block_input if i in ckpt else a for i, a in enumerate(layers, start=1)]
    first = min(cca) if _retrieves(m, w) else None
    if first in ckpt:
        # the first CCA block runs the encoder between two segments: the second segment's
        # input and the normed states the encoder reads are kept too
        stored[first - 1] += 2 * block_input
    peaks = [sum(stored) + enc + head]
    for j in sorted(ckpt):
        kept = sum(stored[:j]) + (enc if first is not None and j >= first else 0)
        peaks.append(kept + layers[j - 1])
    if first is not None:
        enc_grad = w.compute_bytes * _encoder_tokens(m, w) * m.d   # gradient of its output
        peaks.append(sum(stored[:first]) + enc + enc_grad
                     + max(encoder_sub_blocks(m, w, first=True)))
    return max(peaks)


def _cca_positions(m: ModelShape) -> set[int]:
    """Layers with CCA: for the activation count only how many matters; spread them evenly."""
    if not m.cca_layers:
        return set()
    step = m.n_layers / m.cca_layers
    return {m.n_layers - int(i * step) for i in range(m.cca_layers)}


# ------------------------------------------------------------------------------ state
def estimate_memory(m: ModelShape, w: Workload) -> MemoryEstimate:
    """Per-device bytes of one worker of a training stage."""
    shard = w.workers if (w.fsdp and w.workers > 1) else 1
    params = 4.0 * m.params / shard
    grads = 4.0 * m.trainable / shard
    optimizer = 8.0 * m.trainable / shard
    if shard > 1:
        gather = w.compute_bytes
        buffers = (2 * gather * m.largest_unit + 4 * m.largest_unit
                   + gather * m.root_params + 4 * m.root_trainable)
    elif w.workers > 1:
        buffers = 4.0 * m.trainable           # DDP's buckets / the bf16 path's fp32 all-reduce
    else:
        buffers = 0.0
    if shard == 1 and w.compute_bytes < 4:
        # bf16 without FSDP (precision_policy.Bf16Compute): the bf16 copy of every parameter
        # and a micro-batch's bf16 gradients before they are added into the fp32 masters
        buffers += w.compute_bytes * (m.params + m.trainable)
    return MemoryEstimate(params, grads, optimizer, buffers, activations(m, w),
                          activations(m, replace(w, checkpoint_every=0)),
                          activations(m, replace(w, checkpoint_every=1)))


def fix_hint(m: ModelShape, w: Workload, device_bytes: float) -> str:
    """The cheapest change that makes the stage fit, tried in order: activation
    checkpointing, a smaller micro-batch, FSDP, more workers."""
    def fits(x: Workload) -> bool:
        return estimate_memory(m, x).total <= device_bytes

    fixes = []
    if not w.checkpoint_every and fits(replace(w, checkpoint_every=1)):
        fixes.append("turn on activation checkpointing (activation_checkpointing: true)")
    if w.micro_batch > 1:
        for mb in range(w.micro_batch - 1, 0, -1):
            if fits(replace(w, micro_batch=mb)):
                fixes.append(f"micro_batch {mb}")
                break
    if not w.fsdp and w.workers > 1 and fits(replace(w, fsdp=True)):
        fixes.append("fsdp: true")
    for workers in (2 * w.workers, 4 * w.workers, 8 * w.workers, 16 * w.workers):
        x = replace(w, workers=workers, fsdp=True, checkpoint_every=w.checkpoint_every or 1)
        if fits(x):
            fixes.append(f"{workers} workers with fsdp and activation checkpointing")
            break
    return " or ".join(fixes[:2]) if fixes else "no change of workers, checkpointing or " \
        "micro-batch fits it: use a device with more memory"


# ------------------------------------------------------------------------------ from a model
def model_shape(model: Any, units: list | None = None) -> ModelShape:
    """`ModelShape` of a built (meta-device) RetroForCausalLM.

    Args:
        units: the FSDP units the loop shards (default: `loop._shard_units(model)`); the root
            holds every parameter outside them.
    """
    if units is None:
        from retro.components.training.loop import _shard_units

        units = _shard_units(model)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    in_units = {id(p) for u in units for p in u.parameters()}
    root = [p for p in model.parameters() if id(p) not in in_units]
    arch = model.arch
    cfg = model.config
    dec = model.decoder.config
    kv_heads = getattr(dec, "num_key_value_heads", None) or arch.heads
    kv = arch.head_dim * kv_heads
    dropout = any(float(getattr(dec, name, 0.0) or 0.0) > 0 for name in
                  ("attention_dropout", "resid_pdrop", "attn_pdrop")) \
        or float(getattr(cfg, "retro_dropout", 0.0) or 0.0) > 0
    return ModelShape(
        params=total, trainable=trainable, root_params=sum(p.numel() for p in root),
        root_trainable=sum(p.numel() for p in root if p.requires_grad),
        largest_unit=max((sum(p.numel() for p in u.parameters()) for u in units), default=0),
        n_layers=model.n_layers, d=arch.d, heads=arch.heads, kv_dim=kv, ffn=arch.ffn,
        gated=arch.family != "gpt2", vocab=dec.vocab_size, dropout=dropout,
        norm_saves=1 if arch.family == "gpt2" else 2,
        cca_layers=len(model.cca),
        encoder_layers=len(model.encoder.layers) if model.encoder is not None else 0,
        chunk_length=cfg.chunk_length)


def checkpoint_every(setting: Any) -> int:
    """`activation_checkpointing` (bool or N) -> 0 (off), 1 (every block) or N."""
    if setting is True:
        return 1
    if setting is False or setting is None:
        return 0
    return int(setting)


def device_bytes(resources: Any) -> float | None:
    """The declared device memory in bytes (`gpu_memory_gb` wins over `device`), or None."""
    gb = getattr(resources, "gpu_memory_gb", None)
    if gb is None and getattr(resources, "device", None):
        gb = DEVICES_GB[resources.device]
    return None if gb is None else gb * GiB


def fmt_gib(x: float) -> str:
    return f"{x / GiB:.1f}" if x >= 0.1 * GiB else f"{x / GiB:.3f}"


def plan_rows(m: ModelShape, w: Workload, resources: Any) -> dict[str, str]:
    """`retro plan` info: the per-device breakdown, and whether it fits the declared device."""
    est = estimate_memory(m, w)
    ckpt = {0: "off", 1: "every block"}.get(w.checkpoint_every,
                                            f"every {w.checkpoint_every} blocks")
    gathers = "fsdp gathers" if w.fsdp and w.workers > 1 else "ddp buckets"
    rows = {"memory/device": (
        f"{fmt_gib(est.total)} GiB (params {fmt_gib(est.params)}, grads {fmt_gib(est.grads)}, "
        f"adamw {fmt_gib(est.optimizer)}, {gathers} {fmt_gib(est.buffers)}, activations "
        f"{fmt_gib(est.activations)}; micro-batch {w.micro_batch} x seq {w.seq}, "
        f"checkpointing {ckpt})"),
        "memory/activations": (f"{fmt_gib(est.activations_no_ckpt)} GiB without "
                               f"checkpointing, {fmt_gib(est.activations_full_ckpt)} with")}
    total = device_bytes(resources)
    if total is not None:
        name = getattr(resources, "device", None) or "gpu_memory_gb"
        cap = usable_bytes(total)
        of = f"{cap / GiB:.1f} usable of {total / GiB:g} GiB ({name})"
        if est.total <= cap:
            rows["memory/fits"] = f"yes: {est.total / GiB:.1f} GiB, {of}"
        else:
            rows["memory/fits"] = (f"NO: {est.total / GiB:.1f} GiB > {of}; "
                                   f"fix: {fix_hint(m, w, cap)}")
    return rows


def retrieved_length(chunk_length: int) -> int:
    """r: a neighbour chunk plus its continuation (RETRO: 2m)."""
    return 2 * chunk_length


"""RETRO / InstructRetro in one file: a transformers causal LM as the decoder, plus a Retro
encoder over retrieved neighbours and chunked cross-attention (CCA) in chosen decoder layers.

Read top to bottom: config -> small layers (norm, rotary, attention, MLP) -> Retro encoder ->
chunked cross-attention -> RetroForCausalLM (the decoder loop with CCA between self-attention
and MLP, as in Megatron) -> save / load.

Dimension legend used in the shape comments:
    b  batch                         n  sequence length (any; need not be a multiple of m)
    m  chunk length (64)             l  attending chunks = n // m (complete chunks)
    k  neighbours per chunk (2)      r  retrieved tokens per neighbour (2m: neighbour + continuation)
    d  model width                   h  heads, hd head dim
    V  vocabulary

Facts (../shared/REFERENCE.md §1.3-1.4, Megatron `retro_decoder_cross_attention`):
- The encoder embeds neighbour tokens with the decoder's embedding table, runs `encoder_layers`
  bidirectional layers, and its first layer cross-attends to the decoder hidden states of the
  retrieving chunk, taken (post self-attention, normed) at the first CCA layer. Later CCA layers
  reuse the encoder output.
- CCA queries are shifted by m - 1: attending chunk j covers positions (j+1)m-1 ... (j+2)m-2, the
  last token of chunk j plus the first m-1 tokens of chunk j+1, and attends to the k·r encoded
  neighbour tokens of chunk j. Positions 0 ... m-2 get no CCA. So the neighbours of chunk j reach
  no position before (j+1)m-1: the model stays causal.
- A scalar `gate` multiplies the CCA output. Gate 0 (or no neighbours) skips encoder and CCA, so
  the model is then exactly its decoder (InstructRetro's encoder-bypass).
- Neighbour token ids < 0 are padding: masked as keys everywhere; a chunk without any valid
  neighbour token gets zero CCA output (no NaN, no leak).
- Positions: Megatron gives encoder and CCA no positional signal. Here `encoder_rope` (default on)
  adds rotary positions inside the encoder's self-attention, so the encoder knows token order
  within a neighbour (RETRO used relative positions there); CCA stays position-free.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from retro.components.models.retro.layout import RETRO_CONFIG, RETRO_INDEX, RETRO_WEIGHTS

LLAMA_LIKE = ("llama", "phi3", "mistral", "qwen2")
"""transformers model types whose layers are (input_layernorm, self_attn,
post_attention_layernorm, mlp) over RoPE; `gpt2` is the other supported layout."""


@dataclass
class RetroConfig:
    """Everything needed to rebuild the model; saved as retro_config.json."""

    decoder: dict
    """transformers config of the decoder (`PretrainedConfig.to_dict()`)."""
    chunk_length: int = 64
    """m: tokens per chunk."""
    cca_layers: list[int] = field(default_factory=list)
    """1-based decoder layers with chunked cross-attention."""
    encoder_layers: int = 2
    """Bidirectional encoder layers (the first also cross-attends to the decoder chunk)."""
    gate: float = 1.0
    """Multiplies the CCA output; 0 bypasses retrieval."""
    encoder_rope: bool = True
    """Rotary positions in the encoder's self-attention."""
    retro_dropout: float = 0.0
    """Dropout in encoder and CCA."""
    init_std: float = 0.02
    """Normal std of the fresh encoder / CCA weights."""
    retro: bool = True
    """False: a plain decoder (no encoder, no CCA), e.g. the GPT baseline."""


@dataclass
class RetroOutput:
    logits: torch.Tensor  # [b, n, V]
    loss: Optional[torch.Tensor] = None  # scalar: mean CE over counted positions


@dataclass
class _Arch:
    """What the encoder and CCA copy from the decoder."""

    family: str  # "llama" or "gpt2"
    d: int
    heads: int
    head_dim: int
    ffn: int
    bias: bool
    eps: float
    rotary_percent: float
    rope_theta: float


def decoder_arch(hf_config) -> _Arch:
    """Read width, heads, MLP and norm settings off a transformers decoder config."""
    mt = hf_config.model_type
    if mt == "gpt2":
        d, heads = hf_config.n_embd, hf_config.n_head
        return _Arch("gpt2", d, heads, d // heads, hf_config.n_inner or 4 * d, True,
                     hf_config.layer_norm_epsilon, 1.0, 10000.0)
    if mt in LLAMA_LIKE:
        d, heads = hf_config.hidden_size, hf_config.num_attention_heads
        rope = getattr(hf_config, "rope_parameters", None) or {}
        return _Arch("llama", d, heads, getattr(hf_config, "head_dim", None) or d // heads,
                     hf_config.intermediate_size, bool(getattr(hf_config, "attention_bias", False)),
                     hf_config.rms_norm_eps, float(rope.get("partial_rotary_factor", 1.0)),
                     float(rope.get("rope_theta", 10000.0)))
    raise ValueError(f"unsupported decoder model_type {mt!r}: Retro can wrap "
                     f"{', '.join(('gpt2',) + LLAMA_LIKE)}")


# --- small layers -----------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(arch: _Arch) -> nn.Module:
    return nn.LayerNorm(arch.d, eps=arch.eps) if arch.family == "gpt2" else RMSNorm(arch.d, arch.eps)


class Rotary(nn.Module):
    """RoPE on the first `percent` of each head's dims (rotate-half layout, as Megatron/HF)."""

    def __init__(self, head_dim: int, percent: float, theta: float):
        super().__init__()
        self.rot, self.theta = int(head_dim * percent) // 2 * 2, theta
        self.register_buffer("inv_freq", self.frequencies(), persistent=False)

    def frequencies(self):
        """The inverse frequencies (recomputed after a meta-device build: `fresh_init`)."""
        return 1.0 / (self.theta ** (torch.arange(0, self.rot, 2, dtype=torch.float) / self.rot))

    def forward(self, x):  # x: [B, h, t, hd]
        t = x.shape[-2]
        freqs = torch.arange(t, device=x.device, dtype=torch.float)[:, None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)  # [t, rot]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        x_rot, x_pass = x[..., : self.rot], x[..., self.rot:]
        x1, x2 = x_rot.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        out = x_rot * cos + rotated * sin
        return out if x_pass.shape[-1] == 0 else torch.cat((out, x_pass), dim=-1)


class Attention(nn.Module):
    """Multi-head attention through SDPA: self-attention when `ctx` is None, else cross.

    `key_mask` [B, tk] (True = real key) hides padding. A query row whose keys are all padding
    attends to everything instead (finite numbers, no NaN) and its output is zeroed, so nothing
    leaks from padding and gradients stay finite.
    """

    def __init__(self, arch: _Arch, dropout: float, rotary: Optional[Rotary] = None):
        super().__init__()
        inner = arch.heads * arch.head_dim
        self.heads, self.head_dim, self.dropout = arch.heads, arch.head_dim, dropout
        self.q_proj = nn.Linear(arch.d, inner, bias=arch.bias)
        self.k_proj = nn.Linear(arch.d, inner, bias=arch.bias)
        self.v_proj = nn.Linear(arch.d, inner, bias=arch.bias)
        self.o_proj = nn.Linear(inner, arch.d, bias=arch.bias)
        self.rotary = rotary
        self.fp32_cpu = False   # inference under bf16 on CPU: attention in fp32 (attention.py)

    def kv(self, ctx):  # ctx: [B, tk, d] -> keys, values [B, h, tk, hd]
        """Key/value projections of `ctx`: what a cached cross-attention computes once."""
        B = ctx.shape[0]
        k = self.k_proj(ctx).view(B, -1, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(ctx).view(B, -1, self.heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x, ctx=None, key_mask=None, kv=None):  # x: [B, tq, d], ctx: [B, tk, d]
        """`kv`: precomputed `self.kv(ctx)` (cross-attention only; then `ctx` is unused)."""
        B, tq, _ = x.shape
        q = self.q_proj(x).view(B, tq, self.heads, self.head_dim).transpose(1, 2)  # [B, h, tq, hd]
        k, v = self.kv(x if ctx is None else ctx) if kv is None else kv  # [B, h, tk, hd]
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        mask = has_key = None
        if key_mask is not None and not bool(key_mask.all()):  # no padding: the faster path
            has_key = key_mask.any(-1)  # [B]
            mask = (key_mask | ~has_key[:, None])[:, None, None, :]  # [B, 1, 1, tk]
        if self.fp32_cpu:
            from retro.components.models.retro.attention import sdpa

            y = sdpa(q, k, v, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = self.o_proj(y.transpose(1, 2).reshape(B, tq, -1))  # [B, tq, d]
        if has_key is not None:
            y = y * has_key[:, None, None].to(y.dtype)
        return y


class MLP(nn.Module):
    """SwiGLU for the llama family, GELU (tanh) for gpt2: the decoder's own MLP type."""

    def __init__(self, arch: _Arch):
        super().__init__()
        self.gated = arch.family != "gpt2"
        if self.gated:
            self.gate_proj = nn.Linear(arch.d, arch.ffn, bias=arch.bias)
        self.up_proj = nn.Linear(arch.d, arch.ffn, bias=arch.bias)
        self.down_proj = nn.Linear(arch.ffn, arch.d, bias=arch.bias)

    def forward(self, x):
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


# --- Retro encoder ----------------------------------------------------------------------------

class RetroEncoderLayer(nn.Module):
    """Pre-norm bidirectional layer: self-attention, [cross-attention to the decoder chunk], MLP."""

    def __init__(self, arch: _Arch, dropout: float, cross: bool, rope: bool):
        super().__init__()
        rotary = Rotary(arch.head_dim, arch.rotary_percent, arch.rope_theta) if rope else None
        self.norm1 = make_norm(arch)
        self.self_attn = Attention(arch, dropout, rotary)
        self.cross = cross
        if cross:
            self.norm_cross = make_norm(arch)
            self.cross_attn = Attention(arch, dropout)
        self.norm2 = make_norm(arch)
        self.mlp = MLP(arch)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, key_mask, chunk_states, run=None):
        # x: [b·l, k, r, d] neighbour tokens; key_mask: [b·l, k, r]; chunk_states: [b·l, m, d]
        # `run`: how each sub-block runs (activation checkpointing recomputes them one by one:
        # an encoder layer sees k·r/m = 4x the decoder's tokens, too big to rebuild whole)
        run = run or _call
        bl, k, r, d = x.shape
        x = run(self._self_block, x, key_mask)  # [b·l, k·r, d]
        if self.cross:  # every neighbour of a chunk queries that chunk's states
            x = run(self._cross_block, x, chunk_states)
        x = run(self._mlp_block, x)
        return x.view(bl, k, r, d)

    def _self_block(self, x, key_mask):
        bl, k, r, d = x.shape
        flat = x.reshape(bl * k, r, d)
        flat = flat + self.drop(self.self_attn(self.norm1(flat), key_mask=key_mask.reshape(bl * k, r)))
        return flat.view(bl, k * r, d)

    def _cross_block(self, x, chunk_states):
        return x + self.drop(self.cross_attn(self.norm_cross(x), ctx=chunk_states))

    def _mlp_block(self, x):
        return x + self.drop(self.mlp(self.norm2(x)))


class RetroEncoder(nn.Module):
    """Encodes each chunk's k neighbours, conditioned on that chunk's decoder states."""

    def __init__(self, arch: _Arch, n_layers: int, dropout: float, rope: bool):
        super().__init__()
        self.layers = nn.ModuleList(
            RetroEncoderLayer(arch, dropout, cross=(i == 0), rope=rope) for i in range(n_layers))
        self.norm = make_norm(arch)
        self.checkpoint = False  # recompute each sub-block in backward (activation checkpointing)

    def forward(self, emb, key_mask, chunk_states):
        # emb: [b·l, k, r, d]; key_mask: [b·l, k, r]; chunk_states: [b·l, m, d]
        run = _checkpointed if self.checkpoint and torch.is_grad_enabled() else _call
        for layer in self.layers:
            emb = layer(emb, key_mask, chunk_states, run)
        bl, k, r, d = emb.shape
        return self.norm(emb.reshape(bl, k * r, d))  # [b·l, k·r, d]


# --- chunked cross-attention ------------------------------------------------------------------

class ChunkedCrossAttention(nn.Module):
    """CCA of one decoder layer: own pre-norm + cross-attention, with the m-1 causal shift."""

    def __init__(self, arch: _Arch, chunk_length: int, dropout: float):
        super().__init__()
        self.m = chunk_length
        self.norm = make_norm(arch)
        self.attn = Attention(arch, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, enc, enc_mask):
        # x: [b, n, d] normed decoder states; enc: [b·l, k·r, d]; enc_mask: [b·l, k·r]
        b, n, d = x.shape
        m, l = self.m, n // self.m
        q = x[:, m - 1: m - 1 + l * m]  # [b, ≤ l·m, d]: positions m-1 ... n-1
        q = F.pad(q, (0, 0, 0, l * m - q.shape[1]))  # [b, l·m, d]: zero rows past the end
        y = self.attn(q.reshape(b * l, m, d), ctx=enc, key_mask=enc_mask)  # [b·l, m, d]
        y = y.reshape(b, l * m, d)[:, : n - (m - 1)]  # [b, n-m+1, d]
        return self.drop(F.pad(y, (0, 0, m - 1, 0)))  # [b, n, d]: positions < m-1 get zeros


# --- the model --------------------------------------------------------------------------------

class RetroForCausalLM(nn.Module):
    """A transformers causal LM (`.decoder`) plus Retro encoder and CCA.

    The decoder layers are run here, one by one, from the decoder's own submodules, so CCA can
    sit between self-attention and MLP; with gate 0 or no neighbours the same loop reproduces
    the decoder's logits bit for bit.
    """

    def __init__(self, config: RetroConfig, decoder=None):
        super().__init__()
        self.config = config
        if decoder is None:
            from transformers import AutoConfig, AutoModelForCausalLM

            dec = dict(config.decoder)
            hf_config = AutoConfig.for_model(dec.pop("model_type"), **dec)
            # fp32 even when the config records a bf16 checkpoint's dtype (from_config honours it)
            decoder = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa",
                                                       dtype=torch.float32)
        self.decoder = decoder
        self.arch = decoder_arch(decoder.config)
        self.n_layers = len(self._layers())
        bad = [i for i in config.cca_layers if not 1 <= i <= self.n_layers]
        if config.retro and (bad or not config.cca_layers):
            raise ValueError(f"cca_layers {config.cca_layers} must be non-empty and within "
                             f"1..{self.n_layers} (1-based decoder layers)")
        if config.retro:
            self.encoder = RetroEncoder(self.arch, config.encoder_layers, config.retro_dropout,
                                        config.encoder_rope)
            self.cca = nn.ModuleDict({str(i): ChunkedCrossAttention(
                self.arch, config.chunk_length, config.retro_dropout) for i in config.cca_layers})
            for part in (self.encoder, self.cca):
                for name, module in part.named_modules():
                    self._init_fresh(name, module)
        else:
            self.encoder, self.cca = None, nn.ModuleDict()
        self.gate = config.gate
        self.checkpoint_every = 0  # activation checkpointing (set_activation_checkpointing)

    def _init_fresh(self, name, module):
        """Megatron's init: normal(0, init_std); the output projections of attention and MLP
        (linear_proj / linear_fc2) normal(0, init_std / sqrt(2 L)) with L the decoder's layers
        (`scaled_init_method_normal` of the model config, which the encoder's copy keeps)."""
        if isinstance(module, nn.Linear):
            std = self.config.init_std
            if name.endswith(("o_proj", "down_proj")):
                std /= (2 * self.n_layers) ** 0.5
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    # The decoder's pieces, per layout. Each mirrors the transformers forward op for op.

    def _layers(self):
        return self.decoder.transformer.h if self.arch.family == "gpt2" else self.decoder.model.layers

    def _embed(self, input_ids, position_ids):
        if self.arch.family == "gpt2":
            t = self.decoder.transformer
            return t.drop(t.wte(input_ids) + t.wpe(position_ids)), None
        h = self.decoder.model.embed_tokens(input_ids)
        return h, self.decoder.model.rotary_emb(h, position_ids=position_ids)

    def _self_attention(self, layer, h, rope, cache=None, mask=None):
        """`cache`: a transformers Cache the layer appends its keys/values to (generation);
        `mask`: None (causal) or [b, 1, tq, tk] bool, True = may attend."""
        if self.arch.family == "gpt2":
            a, _ = layer.attn(layer.ln_1(h), attention_mask=mask, cache=cache)
            return a + h
        a, _ = layer.self_attn(hidden_states=layer.input_layernorm(h), attention_mask=mask,
                               position_embeddings=rope, cache=cache)
        drop = getattr(layer, "resid_attn_dropout", None)  # phi3 only
        return h + (drop(a) if drop is not None else a)

    def _mlp(self, layer, h):
        if self.arch.family == "gpt2":
            return h + layer.mlp(layer.ln_2(h))
        y = layer.mlp(layer.post_attention_layernorm(h))
        drop = getattr(layer, "resid_mlp_dropout", None)
        return h + (drop(y) if drop is not None else y)

    def _head(self, h):
        norm = self.decoder.transformer.ln_f if self.arch.family == "gpt2" else self.decoder.model.norm
        return self.decoder.lm_head(norm(h))

    def _block(self, i, layer, h, rope, enc, nb_mask):
        """Decoder layer `i` (1-based) once the encoder has run (`enc`; None: no retrieval):
        self-attention, CCA when the layer has one, MLP. What a checkpoint recomputes."""
        return self._cross_mlp(i, layer, self._self_attention(layer, h, rope), enc, nb_mask)

    def _cross_mlp(self, i, layer, h, enc, nb_mask):
        if enc is not None and str(i) in self.cca:
            cca = self.cca[str(i)]
            x = cca.norm(h)  # [b, n, d]
            h = h + self.gate * cca(x, enc, nb_mask.reshape(enc.shape[0], -1))
        return self._mlp(layer, h)

    def _encode(self, i, h, nb_emb, nb_mask):
        """The encoder over the neighbours, conditioned on the chunks of layer `i`'s states
        (post self-attention, normed by that layer's CCA norm)."""
        b, n, _ = h.shape
        m = self.config.chunk_length
        l = n // m
        x = self.cca[str(i)].norm(h)  # [b, n, d]
        chunks = x[:, : l * m].reshape(b * l, m, -1)  # [b·l, m, d]
        return self.encoder(nb_emb, nb_mask, chunks)  # [b·l, k·r, d]

    def set_activation_checkpointing(self, every: int) -> None:
        """Recompute decoder blocks 1, 1 + every, 1 + 2·every, ... in backward instead of
        keeping their activations, and (any `every` > 0) each encoder layer (0: off). An
        execution setting: not saved, numerics unchanged (the RNG state is replayed, so
        dropout masks match)."""
        if every < 0:
            raise ValueError(f"activation checkpointing every {every} blocks: use 0 (off) or N >= 1")
        self.checkpoint_every = int(every)
        if self.encoder is not None:
            self.encoder.checkpoint = every > 0

    # Retrieval inputs.

    def _neighbours(self, neighbours, b, n):
        """Check [b, L, k, r] and keep the l = n // m chunks that have attending positions."""
        m, l = self.config.chunk_length, n // self.config.chunk_length
        if neighbours.dim() != 4 or neighbours.shape[0] != b:
            raise ValueError(f"neighbours must be [batch={b}, chunks, k, r], got "
                             f"{tuple(neighbours.shape)}")
        L, k, r = neighbours.shape[1:]
        if L > -(-n // m):
            raise ValueError(f"{L} neighbour chunks for {n} tokens; at most ceil(n/m) = "
                             f"{-(-n // m)} (m = {m})")
        nb = neighbours[:, :l]  # the last, incomplete chunk never reaches a position < n
        if L < l:  # fewer chunks given: the rest retrieve nothing
            nb = F.pad(nb, (0, 0, 0, 0, 0, l - L), value=-1)
        return nb.reshape(b * l, k, r)  # [b·l, k, r]

    def forward(self, input_ids, neighbours=None, labels=None, loss_mask=None) -> RetroOutput:
        """Logits, and the loss when `labels` are given.

        Args:
            input_ids: [b, n] token ids; n need not be a multiple of m.
            neighbours: None or [b, L, k, r] token ids of each chunk's neighbours (+
                continuations), L ≤ ceil(n/m) (missing trailing chunks retrieve nothing); ids < 0
                are padding. None, gate 0, or n < m: the plain decoder.
            labels: [b, n] targets ALREADY SHIFTED: logits[:, t] is scored against labels[:, t]
                (Megatron / nanoGPT convention: inputs = tokens[:-1], labels = tokens[1:]).
                Ids < 0 are ignored.
            loss_mask: [b, n], aligned with labels; only positions with 1 count.

        Returns:
            RetroOutput(logits [b, n, V], loss = mean CE over counted positions, or None).
        """
        b, n = input_ids.shape
        m, l = self.config.chunk_length, n // self.config.chunk_length
        position_ids = torch.arange(n, device=input_ids.device)[None]  # [1, n]
        h, rope = self._embed(input_ids, position_ids)  # [b, n, d]
        retrieve = self.encoder is not None and neighbours is not None and self.gate != 0 and l > 0
        if retrieve:
            nb = self._neighbours(neighbours, b, n)  # [b·l, k, r]
            nb_mask = nb >= 0
            nb_emb = self.decoder.get_input_embeddings()(nb.clamp(min=0))  # [b·l, k, r, d]
            enc = None
        else:
            nb_emb = nb_mask = enc = None
        every = self.checkpoint_every if torch.is_grad_enabled() else 0
        for i, layer in enumerate(self._layers(), start=1):
            # a checkpointed block keeps its inputs and recomputes the rest in backward
            run = _checkpointed if every and (i - 1) % every == 0 else _call
            if retrieve and enc is None and str(i) in self.cca:
                # the first CCA layer runs the encoder between its self-attention and its
                # CCA; checkpointed, the encoder is a segment of its own (its layers
                # recomputed one by one), so no block recompute runs it again
                h = run(self._self_attention, layer, h, rope)
                enc = self._encode(i, h, nb_emb, nb_mask)
                h = run(self._cross_mlp, i, layer, h, enc, nb_mask)
            else:
                h = run(self._block, i, layer, h, rope, enc, nb_mask)
        logits = self._head(h)  # [b, n, V]
        loss = None if labels is None else masked_ce(logits, labels, loss_mask)
        return RetroOutput(logits=logits, loss=loss)

    # Save / load: decoder in transformers layout (decoder/), Retro parts beside it.

    def save_pretrained(self, path, weights: bool = True) -> Path:
        """Write `retro_config.json`, `retro.safetensors` (encoder + CCA) and `decoder/`
        (transformers `save_pretrained`, so `AutoModelForCausalLM.from_pretrained(path /
        "decoder")` loads the decoder alone). `weights=False`: the configs only (a sharded
        model's weights are streamed there by `training/sharded_export.py`)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if weights:
            self.decoder.save_pretrained(path / "decoder")
            state = {k: v.detach().contiguous() for k, v in self.state_dict().items()
                     if not k.startswith("decoder.")}
            save_file(state, str(path / RETRO_WEIGHTS))
        else:
            self.decoder.config.save_pretrained(path / "decoder")
            if getattr(self.decoder, "generation_config", None) is not None:
                self.decoder.generation_config.save_pretrained(path / "decoder")
        config = asdict(self.config) | {"gate": self.gate,
                                        "decoder": self.decoder.config.to_dict()}
        (path / RETRO_CONFIG).write_text(json.dumps(
            {"architecture": "RetroForCausalLM", **config}, indent=2, default=str))
        return path

    @classmethod
    def from_pretrained(cls, path, device=None) -> "RetroForCausalLM":
        """Load everything `save_pretrained` wrote (this is `resume`; `init_from_gpt` is `init`)."""
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        path = Path(path)
        raw = json.loads((path / RETRO_CONFIG).read_text())
        raw.pop("architecture", None)
        decoder = AutoModelForCausalLM.from_pretrained(  # fp32 whatever was saved (bf16 HF LLMs)
            path / "decoder", dtype=torch.float32, attn_implementation="sdpa")
        config = RetroConfig(**(raw | {"decoder": decoder.config.to_dict()}))
        model = cls(config, decoder=decoder)
        state = {k: v.float() if v.is_floating_point() else v
                 for f in retro_weight_files(path) for k, v in load_file(str(f)).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("decoder.")]
        if missing or unexpected:
            raise ValueError(f"{path / RETRO_WEIGHTS}: missing {missing}, unexpected {unexpected}")
        return model.to(device) if device is not None else model

    @classmethod
    def on_meta(cls, path) -> "RetroForCausalLM":
        """The model `from_pretrained(path)` would load, on the meta device (nothing read but
        the configs); `weight_sources` [(key prefix, folder)] name where its weights are."""
        from transformers import AutoConfig

        path = Path(path)
        raw = json.loads((path / RETRO_CONFIG).read_text())
        raw.pop("architecture", None)
        decoder = AutoConfig.from_pretrained(path / "decoder").to_dict()
        with torch.device("meta"):
            model = cls(RetroConfig(**(raw | {"decoder": decoder})))
        model.weight_sources = [("decoder.", path / "decoder"), ("", path)]
        return model


def retro_weight_files(path) -> list[Path]:
    """The encoder + CCA weight files of a saved model: `retro.safetensors`, or the shards its
    `retro.safetensors.index.json` lists (a streamed export of a large model)."""
    path = Path(path)
    index = path / RETRO_INDEX
    if index.is_file():
        return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"]
                                             .values()))]
    return [path / RETRO_WEIGHTS]


def _call(fn, *args):
    return fn(*args)


def _checkpointed(fn, *args):
    """`fn(*args)` keeping only its inputs for backward, recomputed there (non-reentrant:
    works with DDP / FSDP2 hooks, replays the RNG state)."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(fn, *args, use_reentrant=False)


def masked_ce(logits, labels, loss_mask=None):
    """Mean cross-entropy over positions with labels ≥ 0 and loss_mask == 1 (float32)."""
    keep = labels >= 0
    if loss_mask is not None:
        keep = keep & (loss_mask != 0)
    ce = F.cross_entropy(logits.float().flatten(0, 1), labels.clamp(min=0).flatten(),
                         reduction="none").view_as(labels)
    return (ce * keep).sum() / keep.sum().clamp(min=1)

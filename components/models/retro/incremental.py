"""KV-cached forward of `RetroForCausalLM` for generation: a batch of left-padded rows, one new
block of columns per call (the prompts, then one token per step).

What is cached, per row:
- decoder self-attention keys/values: a transformers `DynamicCache` fed to the decoder's own
  attention modules (the same ones `RetroForCausalLM.forward` runs);
- Retro: each completed chunk's neighbours are retrieved once (`retrieve(chunk text)`), encoded
  once (conditioned on that chunk's states at the first CCA layer, kept while the chunk fills),
  and projected once into every CCA layer's cross-attention keys/values.

Chunks count each row's REAL tokens: with left padding, row r's chunk j is its real tokens
jm ... (j+1)m-1, wherever they sit in the padded batch. CCA keeps RETRO's m-1 shift: a real
position p >= m-1 attends to chunk (p+1)//m - 1, so a chunk's neighbours are retrieved when its
last token is fed and reach that token and the next m-1 (REFERENCE §1.4). Padding columns are
never attended (masked keys), get no positions, and never complete a chunk; a row that stopped
generating is fed padding columns.

Positions: a real token's position id is its index among its row's real tokens, so a
left-padded row computes what it would alone (up to float rounding of the masked sums).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from retro.components.devices import module_device

Retrieve = Optional[Callable[[str], Any]]


def neighbour_block(found: Any) -> torch.Tensor:
    """A `retrieve` result ([k, r] ids, [r] for one neighbour, k lists of any lengths, None /
    empty for nothing) as a LongTensor [k, r], -1 = padding."""
    if found is None or len(found) == 0:
        return torch.full((1, 1), -1, dtype=torch.long)
    if isinstance(found, torch.Tensor) or not hasattr(found[0], "__len__"):
        t = torch.as_tensor(found, dtype=torch.long)
        return t.reshape(-1, t.shape[-1])
    return _pad_stack([torch.as_tensor(x, dtype=torch.long).reshape(1, -1) for x in found])[:, 0]


def left_pad(prompts: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (ids [b, max len], real [b, max len] bool): each row ends at the last column."""
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("left_pad: no prompts, or an empty prompt")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    real = torch.zeros((len(prompts), width), dtype=torch.bool)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.as_tensor([int(t) for t in p], dtype=torch.long)
        real[r, width - len(p):] = True
    return ids, real


def as_retro(model):
    """A RetroForCausalLM as is; a bare transformers causal LM wrapped as one (`retro: false`,
    no new weights), so both run through CachedRetro."""
    if hasattr(model, "cca") and hasattr(model, "_layers"):
        return model
    from retro.components.models.retro.modeling_retro import RetroConfig, RetroForCausalLM

    return RetroForCausalLM(RetroConfig(decoder=model.config.to_dict(), retro=False),
                            decoder=model)


def _pad_stack(blocks: Sequence[torch.Tensor], value: int = -1) -> torch.Tensor:
    """[k_i, r_i] blocks -> [N, max k, max r], padded with `value`."""
    k = max(t.shape[0] for t in blocks)
    r = max(t.shape[1] for t in blocks)
    out = torch.full((len(blocks), k, r), value, dtype=torch.long)
    for i, t in enumerate(blocks):
        out[i, : t.shape[0], : t.shape[1]] = t
    return out


class CachedRetro:
    """Incremental forward over `b` rows.

    Args:
        model: a RetroForCausalLM in eval mode (a plain decoder: `retro: false`).
        batch: number of rows.
        tokenizer: decodes completed chunks for `retrieve`.
        retrieve: per row, `retrieve(chunk_text) -> neighbour ids` or None (that row retrieves
            nothing and gets no CCA: its decoder alone). Ignored (no retrieval) without an
            encoder or with gate 0.
    """

    def __init__(self, model, batch: int, tokenizer: Any = None,
                 retrieve: Optional[Sequence[Retrieve]] = None):
        from transformers import DynamicCache

        self.model, self.b = model, batch
        self.m = model.config.chunk_length
        self.device = module_device(model)
        self.cache = DynamicCache(config=model.decoder.config)
        self.real = torch.zeros((batch, 0), dtype=torch.bool, device=self.device)
        self.n_real = [0] * batch
        self.tokenizer = tokenizer
        self.retrieve = list(retrieve) if retrieve is not None else [None] * batch
        self.use_retrieval = (model.encoder is not None and model.gate != 0
                              and any(r is not None for r in self.retrieve))
        self.cca_ids = [i for i in range(1, model.n_layers + 1) if str(i) in model.cca]
        self.tokens: list[list[int]] = [[] for _ in range(batch)]    # real tokens per row
        self.neighbours: list[list[Any]] = [[] for _ in range(batch)]  # retrieve() results
        self._states: list[list[torch.Tensor]] = [[] for _ in range(batch)]  # open chunk [d]
        # per CCA layer: keys / values of each row's latest completed chunk, and its key mask
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._kv_mask = torch.zeros((batch, 0), dtype=torch.bool, device=self.device)
        self._pending: dict[tuple[int, int], tuple] = {}  # (row, chunk) encoded this call

    @classmethod
    def prefill(cls, model, prompts: Sequence[Sequence[int]], tokenizer: Any = None,
                retrieve: Optional[Sequence[Retrieve]] = None
                ) -> tuple["CachedRetro", torch.Tensor]:
        """A state holding `prompts` (left-padded into one batch) and their last logits [b, V].

        Each prompt runs alone first (unpadded, one block: causal attention with no mask,
        SDPA's fast kernel; no compute on padding), then the per-row caches are merged, left
        padded with masked zero keys. Only the decode steps run batched (there a [b, 1, 1, S]
        mask is cheap)."""
        b = len(prompts)
        retrieve = list(retrieve) if retrieve is not None else [None] * b
        if not prompts or min(len(p) for p in prompts) == 0:
            raise ValueError("prefill: no prompts, or an empty prompt")
        rows, logits = [], []
        for p, fetch in zip(prompts, retrieve):
            row = cls(model, 1, tokenizer, [fetch])
            logits.append(row.step(torch.as_tensor([[int(t) for t in p]], dtype=torch.long)))
            rows.append(row)
        if b == 1:
            return rows[0], logits[0]
        state = cls(model, b, tokenizer, retrieve)
        state._merge(rows)
        return state, torch.cat(logits)

    def _merge(self, rows: list["CachedRetro"]) -> None:
        """Adopt single-row states (same model) as this state's rows, left-padded."""
        width = max(r.real.shape[1] for r in rows)
        pad = [width - r.real.shape[1] for r in rows]
        self.real = torch.stack([torch.nn.functional.pad(r.real[0], (p, 0), value=False)
                                 for r, p in zip(rows, pad)])
        for i, _ in enumerate(rows[0].cache.layers):
            ks = [torch.nn.functional.pad(r.cache.layers[i].keys, (0, 0, p, 0))
                  for r, p in zip(rows, pad)]
            vs = [torch.nn.functional.pad(r.cache.layers[i].values, (0, 0, p, 0))
                  for r, p in zip(rows, pad)]
            self.cache.update(torch.cat(ks), torch.cat(vs), i)
        self.n_real = [r.n_real[0] for r in rows]
        self.tokens = [r.tokens[0] for r in rows]
        self.neighbours = [r.neighbours[0] for r in rows]
        self._states = [r._states[0] for r in rows]
        widths = [r._kv_mask.shape[1] for r in rows if r._kv]
        if widths:  # each row's current chunk keys/values, padded to the widest
            w = max(widths)
            self._kv_mask = torch.zeros((self.b, w), dtype=torch.bool, device=self.device)
            for n, r in enumerate(rows):
                if r._kv:
                    self._kv_mask[n, :r._kv_mask.shape[1]] = r._kv_mask[0]
            arch = self.model.arch
            for i in self.cca_ids:
                dtype = next(r._kv[i][0].dtype for r in rows if r._kv)
                K = torch.zeros((self.b, arch.heads, w, arch.head_dim), dtype=dtype,
                                device=self.device)
                V = torch.zeros_like(K)
                for n, r in enumerate(rows):
                    if r._kv:
                        K[n, :, :r._kv[i][0].shape[2]] = r._kv[i][0][0]
                        V[n, :, :r._kv[i][1].shape[2]] = r._kv[i][1][0]
                self._kv[i] = (K, V)

    @property
    def retrieved_chunks(self) -> list[int]:
        return [len(x) for x in self.neighbours]

    def step(self, ids: torch.Tensor, real: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Feed columns `ids` [b, T] (`real` [b, T] bool, False = padding; default all real);
        returns the logits [b, V] at the last column."""
        ids = ids.to(self.device)
        real = torch.ones_like(ids, dtype=torch.bool) if real is None else real.to(self.device)
        b, T = ids.shape
        past = self.real.shape[1]
        # positions: index among the row's real tokens (padding: clamped, never attended)
        start = torch.tensor(self.n_real, device=self.device)[:, None]
        pos = (start + real.long().cumsum(1) - 1).clamp(min=0)           # [b, T]
        completed = self._note_tokens(ids, real)       # [(row, chunk j, column of its last token)]
        self.real = torch.cat([self.real, real], dim=1)                   # [b, past + T]
        mask = self._attention_mask(past, T)
        h, rope = self.model._embed(ids, pos)                             # [b, T, d]
        for i, layer in enumerate(self.model._layers(), start=1):
            h = self.model._self_attention(layer, h, rope, cache=self.cache, mask=mask)
            if self.use_retrieval and i in self.cca_ids:
                x = self.model.cca[str(i)].norm(h)                        # [b, T, d]
                if i == self.cca_ids[0]:
                    self._encode_completed(x, real, completed)
                    if T == 1:  # the one new position attends to its newest chunk
                        self._promote()
                h = h + self.model.gate * self._cca(i, x, real, pos)
            h = self.model._mlp(layer, h)
        self._promote()  # a block's columns were served from _pending and the older chunk
        return self.model._head(h[:, -1:])[:, 0]                          # [b, V]

    # --- bookkeeping ---------------------------------------------------------------------

    def _note_tokens(self, ids, real) -> list[tuple[int, int, int]]:
        """Append real tokens per row; retrieve for every chunk they complete."""
        done = []
        rows, cols = torch.nonzero(real, as_tuple=True)
        values = ids[rows, cols].tolist()
        for r, c, t in zip(rows.tolist(), cols.tolist(), values):
            self.tokens[r].append(int(t))
            self.n_real[r] += 1
            fetch = self.retrieve[r]
            if self.n_real[r] % self.m == 0 and self.use_retrieval and fetch is not None:
                j = self.n_real[r] // self.m - 1
                text = self.tokenizer.decode(self.tokens[r][j * self.m:(j + 1) * self.m])
                self.neighbours[r].append(fetch(text))
                done.append((r, j, c))
        return done

    def _attention_mask(self, past: int, T: int):
        """[b, 1, T, past + T] bool (True = attend): real keys at or before the query column.
        None when that is plain causal attention over an unpadded batch."""
        if bool(self.real.all()) and (T == 1 or past == 0):
            return None
        S = past + T
        q_col = torch.arange(past, S, device=self.device)[:, None]       # [T, 1]
        k_col = torch.arange(S, device=self.device)[None]                 # [1, S]
        allowed = (k_col <= q_col)[None] & self.real[:, None, :]          # [b, T, S]
        allowed |= (k_col == q_col)[None]  # padding queries see themselves: no all-masked row
        return allowed[:, None]

    # --- Retro: encoder once per chunk, CCA from cached keys/values -------------------------

    def _encode_completed(self, x, real, completed) -> None:
        """Collect first-CCA-layer states of the open chunks; encode the chunks completed in
        this call and project them into every CCA layer's keys/values (`self._pending`)."""
        d = x.shape[-1]
        ends = {(r, c): j for r, j, c in completed}
        states, blocks, owners = [], [], []
        for r in range(self.b):
            if self.retrieve[r] is None:  # this row never retrieves: its CCA stays zero
                continue
            run = self._states[r]
            for c in torch.nonzero(real[r], as_tuple=True)[0].tolist():
                run.append(x[r, c])
                if (r, c) in ends:
                    j = ends[(r, c)]
                    states.append(torch.stack(run))                        # [m, d]
                    blocks.append(neighbour_block(self.neighbours[r][j]))
                    owners.append((r, j))
                    run = []
            self._states[r] = run
        if not owners:
            return
        nb = _pad_stack(blocks).to(self.device)                           # [N, k, r]
        nb_mask = nb >= 0
        emb = self.model.decoder.get_input_embeddings()(nb.clamp(min=0))  # [N, k, r, d]
        enc = self.model.encoder(emb, nb_mask, torch.stack(states).view(-1, self.m, d))
        enc_mask = nb_mask.reshape(len(owners), -1)                       # [N, k·r]
        kvs = {i: self.model.cca[str(i)].attn.kv(enc) for i in self.cca_ids}  # [N, h, k·r, hd]
        for n, key in enumerate(owners):
            self._pending[key] = ({i: (k[n], v[n]) for i, (k, v) in kvs.items()}, enc_mask[n])

    def _promote(self) -> None:
        """Each row's newest chunk encoded in this call becomes its current CCA chunk."""
        newest: dict[int, int] = {}
        for r, j in self._pending:
            newest[r] = max(j, newest.get(r, -1))
        for r, j in newest.items():
            kv, mask = self._pending[(r, j)]
            width = mask.shape[0]
            if not self._kv or width > self._kv_mask.shape[1]:
                self._grow(width, next(iter(kv.values()))[0].dtype)
            self._kv_mask[r] = False
            self._kv_mask[r, :width] = mask
            for i, (k, v) in kv.items():
                K, V = self._kv[i]
                K[r], V[r] = 0, 0
                K[r, :, :width], V[r, :, :width] = k, v
        self._pending = {}

    def _grow(self, width: int, dtype) -> None:
        """Widen the per-row key/value slots to `width` keys (extra keys are masked)."""
        extra = max(0, width - self._kv_mask.shape[1])
        self._kv_mask = torch.nn.functional.pad(self._kv_mask, (0, extra), value=False)
        arch = self.model.arch
        for i in self.cca_ids:
            empty = torch.zeros((self.b, arch.heads, 0, arch.head_dim), dtype=dtype,
                                device=self.device)
            K, V = self._kv.get(i, (empty, empty))
            self._kv[i] = tuple(torch.nn.functional.pad(t.to(dtype), (0, 0, 0, extra))
                                for t in (K, V))

    def _cca(self, i: int, x, real, pos) -> torch.Tensor:
        """CCA output [b, T, d] of layer i: real position p >= m-1 attends to its row's chunk
        (p+1)//m - 1; padding and positions < m-1 get zeros."""
        attn = self.model.cca[str(i)].attn
        b, T, d = x.shape
        chunk = torch.where(real, (pos + 1) // self.m - 1, -1)           # [b, T]
        if T == 1:  # one step: every row attends to its current chunk, all rows at once
            if not self._kv:
                return torch.zeros_like(x)
            K, V = self._kv[i]
            return attn(x, key_mask=self._kv_mask & (chunk >= 0), kv=(K, V))
        out = torch.zeros_like(x)
        for r in range(b):  # a block (the prompts): per row, per chunk, its columns
            cols = torch.nonzero(chunk[r] >= 0, as_tuple=True)[0]
            for j in torch.unique(chunk[r, cols]).tolist():
                sel = cols[chunk[r, cols] == j]
                (k, v), mask = self._chunk_kv(r, j, i)
                y = attn(x[r:r + 1, sel], key_mask=mask[None], kv=(k[None], v[None]))[0]
                out[r, sel] = y.to(out.dtype)  # autocast: bf16 attention, fp32 residual
        return out

    def _chunk_kv(self, r: int, j: int, i: int):
        """Layer-i keys/values and key mask of row r's chunk j: encoded in this call, or the
        row's current chunk from an earlier call."""
        if (r, j) in self._pending:
            kv, mask = self._pending[(r, j)]
            return kv[i], mask
        K, V = self._kv[i]
        return (K[r], V[r]), self._kv_mask[r]

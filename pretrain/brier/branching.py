"""Branch many short continuations off one teacher-forced KV cache in a few batched passes.

BrierLM's collision terms need, for every evaluated position p of a sequence, the model's next-step
distribution after a few *sampled* tokens appended to the true prefix y_<=p. Running those branches
one position at a time costs up to three extra forward calls per position. Here the teacher-forced
pass fills a Hugging Face `DynamicCache` with the keys/values of the whole block once (wrapped in a
`BranchCache`); each branch step then appends one query per still-active position to that cache and
runs all of them in one forward call, with a custom 4D additive attention mask that lets a query see exactly:

- the teacher-forced columns of its own prefix (`col < prefix_len`),
- the columns its own earlier branch tokens were written to (`prev_cols`),
- itself,

and explicit `position_ids`, so every query computes what it would in an incremental decode of its
own branch (same RoPE angles, same keys/values). The cache keeps growing; stale branch entries are
simply never attended again. Queries run in slices of `max_queries`, and each slice's attention sees
only the cache columns some query of the slice may attend (the longest teacher prefix in the slice,
the slice's earlier branch entries, its own new entries): with queries in position order, attention
costs about what the prefixes need instead of queries × whole cache.

Works for any Llama-style backbone that accepts `inputs_embeds`, `position_ids`, a 4D
`attention_mask` and `past_key_values` (transformers' `LlamaModel`): the discrete baseline's
`model.model` and CALM's chunk-level `transformer`. The attention implementation must honour custom
masks (sdpa or eager; not flash-attention-2), see `ensure_mask_capable`.
"""

from __future__ import annotations

import torch


def ensure_mask_capable(model: torch.nn.Module) -> None:
    """Switch a model using flash-attention-2 (which ignores custom 4D masks) to sdpa."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl is not None and impl.startswith("flash"):
        model.set_attn_implementation("sdpa")


def compact(keep: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Move each row's kept entries (along dim 1) to the front and cut to the widest row.

    Returns the new validity mask (B, M') and the tensors gathered along dim 1 (extra trailing dims
    allowed). Order within a row is preserved.
    """
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    width = int(keep.sum(dim=1).max().item()) if keep.numel() else 0
    order = order[:, :width]
    valid = torch.gather(keep, 1, order)
    out = []
    for t in tensors:
        idx = order.reshape(order.shape + (1,) * (t.dim() - 2)).expand(order.shape + t.shape[2:])
        out.append(torch.gather(t, 1, idx))
    return valid, out


class BranchCache:
    """The teacher-forced keys/values of every layer plus the branch entries appended since.

    Column c < `teacher_len` is a teacher position; column teacher_len + j is the j-th branch entry.
    Branch entries live in per-layer chunk lists, joined only when a slice needs earlier ones, so a
    slice never copies the whole cache (a transformers `DynamicCache` would, on every update).
    """

    def __init__(self, teacher_cache) -> None:
        self.teacher = [(layer.keys, layer.values) for layer in teacher_cache.layers]
        self.teacher_len = self.teacher[0][0].shape[-2]
        self.length = self.teacher_len
        self.chunks: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.teacher]
        self.joined: list[tuple[torch.Tensor, torch.Tensor] | None] = [None for _ in self.teacher]

    def branch_entries(self, layer: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `count` branch entries of a layer as (keys, values)."""
        joined = self.joined[layer]
        if joined is None or joined[0].shape[-2] < count:
            keys, values = zip(*self.chunks[layer])
            joined = self.joined[layer] = (torch.cat(keys, dim=-2), torch.cat(values, dim=-2))
        return joined


class _SliceView:
    """What one slice's forward call sees as its cache: transformers' attention only calls `update`
    when the mask is 4D. It stores the slice's new keys/values and returns just the columns the slice
    may attend: the teacher prefix up to the slice's longest, its earlier branch entries, itself."""

    def __init__(self, cache: BranchCache, prefix: int, earlier: torch.Tensor) -> None:
        self.cache, self.prefix, self.earlier = cache, prefix, earlier

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        cache = self.cache
        cache.chunks[layer_idx].append((keys, values))
        parts_k = [cache.teacher[layer_idx][0][..., : self.prefix, :]]
        parts_v = [cache.teacher[layer_idx][1][..., : self.prefix, :]]
        if self.earlier.numel():
            local = self.earlier - cache.teacher_len
            branch_k, branch_v = cache.branch_entries(layer_idx, int(local.max()) + 1)
            parts_k.append(branch_k.index_select(-2, local))
            parts_v.append(branch_v.index_select(-2, local))
        return torch.cat([*parts_k, keys], dim=-2), torch.cat([*parts_v, values], dim=-2)


@torch.no_grad()
def branch_forward(
    backbone: torch.nn.Module,
    cache: BranchCache,
    inputs_embeds: torch.Tensor,
    position_ids: torch.Tensor,
    prefix_len: torch.Tensor,
    prev_cols: torch.Tensor,
    max_queries: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one branch step for many queries against a shared cache.

    inputs_embeds (B, M, d): the branch token of each query; position_ids (B, M): its position;
    prefix_len (B, M): how many teacher-forced cache columns it sees; prev_cols (B, M, S): cache
    columns of its earlier branch tokens (S may be 0). Padding queries (any prefix_len) just produce
    unused outputs. Queries sorted by prefix (as `compact` leaves them) make the slices cheapest.

    Returns the last hidden states (B, M, d) and the cache columns (B, M) the new entries went to.
    """
    bsz, m = position_ids.shape
    device, dtype = inputs_embeds.device, inputs_embeds.dtype
    hidden, cols = [], []
    for start in range(0, m, max_queries):
        stop = min(m, start + max_queries)
        q = stop - start
        own = cache.length + torch.arange(q, device=device)
        prefix, earlier = prefix_len[:, start:stop], prev_cols[:, start:stop]
        longest, needed = int(prefix.max()), earlier.unique()
        columns = torch.cat([torch.arange(longest, device=device), needed, own])
        allowed = columns.view(1, 1, -1) < prefix[..., None]
        allowed |= columns.view(1, 1, -1) == own.view(1, q, 1)
        if earlier.shape[-1]:
            allowed |= (earlier[..., None] == columns.view(1, 1, 1, -1)).any(-2)
        mask = torch.zeros(bsz, 1, q, columns.numel(), dtype=dtype, device=device)
        mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
        out = backbone(
            inputs_embeds=inputs_embeds[:, start:stop],
            position_ids=position_ids[:, start:stop],
            attention_mask=mask,
            past_key_values=_SliceView(cache, longest, needed),
            use_cache=True,
        )
        cache.length += q
        hidden.append(out.last_hidden_state)
        cols.append(own.expand(bsz, q))
    if not hidden:
        return inputs_embeds.new_zeros(bsz, 0, inputs_embeds.shape[-1]), position_ids.new_zeros(bsz, 0)
    return torch.cat(hidden, dim=1), torch.cat(cols, dim=1)

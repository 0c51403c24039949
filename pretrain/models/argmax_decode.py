"""Exact greedy decoding of CALM latents at a fraction of the full-vocabulary projection's cost.

Generation only needs argmax tokens from the autoencoder decoder, never its logits. The output
projection h·Eᵀ over the whole vocabulary is what dominates a CALM step (K positions × every head
draw × V × d), so it is screened in bfloat16 (2.5-3× faster than float32 on CPUs with bf16 dot
products, half the memory traffic) and certified exact:

- every screened logit is within b = (3u + 2u² + d·2⁻²³)·‖h‖·max‖e_v‖ of the exact one (u = 2⁻⁸,
  bf16 unit roundoff: rounding of h, of E and of the bf16 result; float32 accumulation over d terms);
- the top `shortlist` screened tokens are rescored exactly in float32; if the best exact score beats
  the shortlist's lowest screened score + b, no token outside the shortlist can win, and if it beats
  the runner-up by more than float32 rounding, the reference decoder ranks it first too, so that
  token is the exact argmax. At positions failing the test, only tokens whose screened logit comes
  within b of that best exact score can win: they are rescored in float64, which fixes how float32
  ranks them unless they lie within float32 rounding of each other; only such near-ties take the full
  float32 projection. The shortlist comes from block maxima of the screen (the S best tokens lie in
  the S blocks with the best maxima), not from a top-k over the whole vocabulary. The bf16 matrix is
  laid out for oneDNN once (`_prepack`), not on every screening call.

Repeated draws for one chunk (`decode_draws`) often decode to the same few chunks (the collisions
that low-temperature sampling lives on), and those can skip the projection altogether: one draw per (row, position) is screened as above (the reference),
which bounds every token outside its shortlist S by a ceiling c on the exact logit. Another draw with
decoder state h' = h + Δ has h'·e_v = h·e_v + Δ·e_v ≤ c + ‖Δ‖·max‖e_v‖ for v ∉ S, so if its best
exact score over S beats that (plus the float32 rounding of its own logits), its argmax is that token:
S·d work instead of V·d. Draws left uncertified take the next reference, a few times, then the rest
are screened together (with few draws in a call, all are screened in one pass: each pass has a fixed
cost that the certificates would not win back). A `StreamMemory` keeps each stream's first
reference over the calls that sample one chunk, so later rounds start certified against it.

Sampling at T = 1/2 only asks which pair of consecutive draws is the first to decode equal
(`decode_pairs`), and two draws differ as soon as one position does: a draw's score for another's
token beaten by a shortlist token by more than rounding certifies that, at S·d cost. So a pair is
mostly settled by one screened position, and only the accepted pair is decoded in full.

Small vocabularies (at most `DIRECT_VOCAB` tokens, e.g. a byte-level one) are the other way round:
the float32 projection costs less than the decoder's own per-position layers, so every position is
projected exactly as the reference does, and `decode_pairs` saves decoder work instead: the decoder's
per-latent layers run for every draw, its per-position layers only at the positions where a pair is
still equal (most pairs differ at their first position). Likewise `decode_distinct`, for duplicate
counts over a round of draws (the capped fallback), decodes a draw only as far as its prefix is shared.

So `ArgmaxDecoder(model)(latents)`, `decode_draws` and `decode_pairs` give the same tokens (and the
same first equal pair) as `model.decode_latents(latents)`. Like the reference, they rely on the
decoder's layers computing each row (draw, position) the same whatever the batch it is computed in.
"""

from __future__ import annotations

import torch

BF16_UNIT_ROUNDOFF = 2.0 ** -8


class ArgmaxDecoder:
    """Greedy tokens of a CALM's frozen autoencoder decoder; holds a bf16 copy of the output matrix."""

    DIRECT_VOCAB = 1024
    """Default `direct_vocab`: vocabularies up to this size are projected directly (see __init__)."""

    def __init__(self, model, shortlist: int = 16, max_references: int = 2, min_certifiable: int = 128,
                 direct_vocab: int | None = None):
        ae = model.ae_model
        self.decoder = ae.decoder
        self.patch_size = ae.config.patch_size
        self.weight = ae.encoder.embed_tokens.weight.detach()
        vocab = self.weight.shape[0]
        self.max_norm = float(self.weight.float().norm(dim=1).max())
        self.shortlist = min(shortlist, vocab)
        # The shortlist is taken from block maxima (see _screen); at least `shortlist` blocks are needed.
        self.block = max(1, min(128, vocab // self.shortlist))
        blocks = -(-vocab // self.block)
        self.low = torch.zeros(blocks * self.block, self.weight.shape[1], dtype=torch.bfloat16, device=self.weight.device)
        self.low[:vocab] = self.weight.to(torch.bfloat16)
        self.packed = _prepack(self.low)
        self.vocab = vocab
        self.max_references = max_references
        # A screening pass has a fixed cost of about 30 positions' worth (reading the whole bf16 matrix),
        # so references only pay when many draws could be certified against them.
        self.min_certifiable = min_certifiable
        self.near = 0.05
        """decode_pairs: relative distance of a pair's states under which it is decoded whole at once."""
        u, d = BF16_UNIT_ROUNDOFF, self.weight.shape[1]
        self.rel_bound = 1.25 * (3 * u + 2 * u * u + d * 2.0 ** -23)  # 25% slack over the analysis
        self.fp32_bound = 1.25 * d * 2.0 ** -23  # float32 logits alone (a certified draw is never screened)
        self.fp32_dot = 1.25 * d * 2.0 ** -24  # γ_d of one float32 dot product, relative to Σ|h_i e_vi|
        self.max_contenders = 256
        """Unsettled positions with more tokens within the screening bound of the best take the full projection."""
        self.fallbacks = 0
        """Positions the shortlist did not settle (for benchmarks and tests)."""
        self.full_projections = 0
        """Of those, positions that needed the full float32 projection (for benchmarks and tests)."""
        self.projected = 0
        """Positions screened over the whole vocabulary (for benchmarks)."""
        self.screen_rows = 64
        """States screened per slice (`_screen`)."""
        # Below this many tokens the float32 projection costs less than the decoder's per-position layers,
        # so screening and certificates cost more than they save: every decoded position is projected
        # exactly as `decode_latents` does, and pairs are compared position by position (`_pairs_by_position`).
        self.direct = vocab <= (self.DIRECT_VOCAB if direct_vocab is None else direct_vocab)
        self.split = all(hasattr(self.decoder, a) for a in ("latent_to_hidden", "decoder_layers", "n_first",
                                                             "expand_layer", "norm"))

    def _screen(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(M, d) float states -> (exact argmax (M,), shortlist (M, S), ceiling (M,)): no token outside
        the shortlist has an exact logit above the ceiling.

        In slices of `screen_rows` states: a slice's screen (rows × V floats) then stays in cache between
        the product, its widening and the block maxima, which halves the cost of streaming a whole
        (M, V) screen through memory several times when M is large (BrierLM decodes thousands at once)."""
        if hidden.shape[0] <= self.screen_rows:
            return self._screen_rows(hidden)
        parts = [self._screen_rows(part) for part in hidden.split(self.screen_rows)]
        return tuple(torch.cat(p) for p in zip(*parts))

    def _screen_rows(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`_screen` of one slice."""
        m = hidden.shape[0]
        self.projected += m
        # Ranked in bf16 (a float32 copy of the matrix costs a full pass); the product is widened to
        # float32 because CPU reductions over it run several times faster than over bf16.
        screen = self._bf16_logits(hidden.to(torch.bfloat16)).float()
        screen[:, self.vocab:] = -torch.inf  # padding rows of the block layout
        # top-S without a top-k over V: the S largest values lie in the S blocks with the largest maxima
        # (each of them has a block max at least as large, in a distinct block)
        blocks = screen.view(m, -1, self.block).amax(-1).topk(self.shortlist, dim=1).indices
        candidates = (blocks[..., None] * self.block + torch.arange(self.block, device=hidden.device)).view(m, -1)
        top_vals, where = screen.gather(1, candidates).topk(self.shortlist, dim=1)
        top_idx = candidates.gather(1, where)
        norm = hidden.norm(dim=1)
        best, where, clear = self._best(torch.einsum("md,mkd->mk", hidden, self.weight[top_idx]), norm)
        tokens = top_idx.gather(1, where[:, None]).squeeze(1)
        ceiling = top_vals[:, -1] + self.rel_bound * norm * self.max_norm
        unsure = (best <= ceiling) | ~clear
        if unsure.any():
            self.fallbacks += int(unsure.sum())
            tokens[unsure] = self._contest(hidden[unsure], screen[unsure], best[unsure], norm[unsure])
        return tokens, top_idx, ceiling

    def _contest(self, hidden: torch.Tensor, screen: torch.Tensor, best: torch.Tensor,
                 norm: torch.Tensor) -> torch.Tensor:
        """Exact argmax of states (N, d) that their shortlist left unsettled, given their screened logits
        (N, V') and the shortlist's best exact score (N,). A token whose screened logit is more than the
        screening bound below that score has an exact logit below it, so only the others can win. Those
        few are rescored in float64, which gives each true logit and so bounds its float32 value in any
        summation order (`_rank_contenders`); where that fixes the winner, the float32 matrix (2× the bf16
        one) is never read. The rest (near-ties within float32 rounding, too many contenders) take the
        full float32 projection."""
        floor = best - self.rel_bound * norm * self.max_norm
        count = min(max(int((screen >= floor[:, None]).sum(1).max()), 2), screen.shape[1])
        tokens = torch.full_like(best, -1, dtype=torch.long)
        if count <= self.max_contenders:
            candidates = screen.topk(count, dim=1).indices  # each row's contenders, and maybe a few more
            tokens = self._rank_contenders(hidden, candidates)
        full = tokens < 0
        if full.any():
            self.full_projections += int(full.sum())
            tokens[full] = (hidden[full] @ self.weight.T).argmax(dim=1)
        return tokens

    def _rank_contenders(self, hidden: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """States (N, d), candidate tokens (N, C) -> the token (N,) that float32 logits rank first whatever
        their summation order, -1 where rounding could reorder the top. In float64 the products are exact
        and the sum is off by ~1e-14, giving the true logit t_v; a float32 dot product (any order, FMA or
        not) is within γ_d·Σ|h_i e_vi| ≈ d·2⁻²⁴·Σ|h_i e_vi| of it, so the winner's lowest float32 value must
        beat every other candidate's highest."""
        terms = hidden.double()[:, None, :] * self.weight[candidates].double()
        value = terms.sum(-1)
        slack = self.fp32_dot * terms.abs().sum(-1)
        where = value.argmax(1, keepdim=True)
        rival = (value + slack).scatter(1, where, -torch.inf).amax(1)
        clear = (value - slack).gather(1, where).squeeze(1) > rival
        return torch.where(clear, candidates.gather(1, where).squeeze(1), -1)

    def _bf16_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(M, d) bf16 states -> (M, padded V) their bf16 products with the screening matrix (float32
        accumulation either way, so the same bound holds)."""
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(hidden, self.packed, None, "none", [], "")
        if hidden.device.type != "cuda":
            return hidden @ self.low.T
        # cuBLAS may accumulate bf16 products in reduced precision unless told not to; the bound assumes
        # float32 accumulation.
        saved = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        try:
            return hidden @ self.low.T
        finally:
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = saved

    def _best(self, scores: torch.Tensor, norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Exact shortlist scores (N, S) of states with norms (N,) -> (best (N,), its index (N,), clear (N,)):
        clear where the runner-up trails by more than the float32 rounding of two dot products, so the
        reference decoder (its own summation order) ranks the same token first."""
        top = scores.topk(min(2, scores.shape[1]), dim=1)
        best, where = top.values[:, 0], top.indices[:, 0]
        if scores.shape[1] < 2:
            return best, where, torch.ones_like(best, dtype=torch.bool)
        return best, where, top.values[:, 0] - top.values[:, 1] > 2 * self.fp32_bound * norm * self.max_norm

    @torch.no_grad()
    def tokens_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """(M, d) final decoder states -> (M,) exact argmax of hidden @ weight.T."""
        if self.direct:
            self.projected += hidden.shape[0]
            return torch.nn.functional.linear(hidden.to(self.weight.dtype), self.weight).argmax(-1)
        return self._screen(hidden.to(self.weight.dtype))[0]

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (..., T, l) -> token ids (..., T*K), like `CALM.decode_latents`."""
        lead = latents.shape[:-2]
        flat = latents.reshape(-1, *latents.shape[-2:]).to(self.weight.dtype)
        hidden = self.decoder(flat)
        tokens = self.tokens_from_hidden(hidden.reshape(-1, hidden.shape[-1]))
        return tokens.reshape(*lead, hidden.shape[1])

    def _certify(self, states: torch.Tensor, ref: torch.Tensor, top_idx: torch.Tensor,
                 ceiling: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw states (P, M, d) against one screened reference per stream (ref (P, d), its shortlist
        (P, S) and ceiling (P,)) -> (certified (P, M), their tokens (P, M))."""
        scores = torch.einsum("pmd,psd->pms", states, self.weight[top_idx])
        norm = states.norm(dim=-1)
        best, where, clear = (t.view(norm.shape) for t in self._best(scores.flatten(0, 1), norm.flatten()))
        sure = clear & (best > ceiling[:, None] + self._slack(states, ref[:, None], norm))
        return sure, top_idx.gather(1, where)

    def _slack(self, states: torch.Tensor, ref: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """How far a state's logit of any token outside the reference's shortlist can exceed the
        reference's ceiling: h'·e_v = h·e_v + Δ·e_v ≤ ceiling + ‖Δ‖·max‖e_v‖ (module docstring), plus the
        float32 rounding of the state's own dot products."""
        drift = (states - ref).norm(dim=-1) * (1 + 2.0 ** -20)  # rounding of Δ and its norm
        return (drift + self.fp32_bound * norm) * self.max_norm

    def _against(self, states: torch.Tensor, ref: torch.Tensor, top_idx: torch.Tensor, ceiling: torch.Tensor,
                 ref_token: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """States (N, d), each against a screened reference (ref (N, d), shortlist (N, S), ceiling (N,))
        -> (token (N,), -1 where not certified; differs (N,) bool where `ref_token` is given: certified
        not to be the argmax, because a shortlist token beats it by more than the rounding)."""
        scores = torch.einsum("nd,nsd->ns", states, self.weight[top_idx])
        norm = states.norm(dim=-1)
        best, where, clear = self._best(scores, norm)
        sure = clear & (best > ceiling + self._slack(states, ref, norm))
        found = torch.where(sure, top_idx.gather(1, where[:, None]).squeeze(1), -1)
        if ref_token is None:
            return found, None
        listed = top_idx == ref_token[:, None]  # a reference decoded by the fallback may lie outside
        at_ref = scores.gather(1, listed.long().argmax(1, keepdim=True)).squeeze(1)
        differs = listed.any(1) & (best - at_ref > 2 * self.fp32_bound * norm * self.max_norm)
        return found, differs

    @torch.no_grad()
    def decode_draws(self, latents: torch.Tensor, memory: "StreamMemory | None" = None,
                     rows: torch.Tensor | None = None) -> torch.Tensor:
        """Draws (R, M, l) of one chunk latent per row -> token chunks (R, M, K), certified against
        reference draws of the same row (module docstring). With `memory` (and the `rows` of it that
        the R rows are), each stream's first screened draw is kept and certifies later calls' draws."""
        r, m, _ = latents.shape
        k = self.patch_size
        device = latents.device
        hidden = self.decoder(latents.to(self.weight.dtype))  # the decoder is per-position: draws act as time
        if self.direct:
            return self.tokens_from_hidden(hidden.reshape(-1, hidden.shape[-1])).view(r, m, k)
        # one stream per (row, chunk position) holding its M draws' states
        streams = hidden.view(r, m, k, -1).transpose(1, 2).reshape(r * k, m, -1)
        tokens = torch.full((r * k, m), -1, dtype=torch.long, device=device)
        ids = None
        if memory is not None:
            ids = (rows[:, None] * k + torch.arange(k, device=device)).reshape(-1)
            known = memory.ceiling[ids].isfinite().nonzero().squeeze(1)
            if len(known):
                slot = ids[known]
                sure, chosen = self._certify(streams[known], memory.state[slot], memory.top_idx[slot],
                                             memory.ceiling[slot])
                tokens[known] = torch.where(sure, chosen, -1)
        references = self.max_references if r * k * (m - 1) >= self.min_certifiable else 0
        for _ in range(references):
            open_ = tokens < 0
            live = open_.any(1).nonzero().squeeze(1)
            if len(live) == 0:
                break
            first = open_[live].long().argmax(1)  # each live stream's first undecided draw
            states = streams[live]
            ref = states[torch.arange(len(live), device=device), first]
            ref_tokens, top_idx, ceiling = self._screen(ref)
            sure, chosen = self._certify(states, ref, top_idx, ceiling)
            chosen = torch.where(open_[live] & sure, chosen, tokens[live])
            chosen[torch.arange(len(live), device=device), first] = ref_tokens
            tokens[live] = chosen
            if memory is not None:
                memory.keep(ids[live], ref, top_idx, ceiling, ref_tokens)
        rest = tokens < 0
        if rest.any():
            screened, top_idx, ceiling = self._screen(streams[rest])
            tokens[rest] = screened
            if memory is not None:
                lead = (rest.long().cumsum(1) == 1)[rest]  # each stream's first screened draw
                owner = rest.nonzero()[:, 0][lead]
                memory.keep(ids[owner], streams[rest][lead], top_idx[lead], ceiling[lead], screened[lead])
        return tokens.view(r, k, m).transpose(1, 2)

    @torch.no_grad()
    def decode_pairs(self, latents: torch.Tensor, memory: "StreamMemory",
                     rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Draws (R, 2P, l) of one chunk latent per row, read as P consecutive pairs -> (first (R,): the
        first pair whose two draws decode to the same chunk, -1 if none; that chunk (R, K), zeros if none).

        The answer of decoding every draw and comparing (all that sampling at T = 1/2 asks), with far
        less screening, since a pair is settled by one position certified to differ: (1) every draw is
        certified against its row's references in `memory` (decoded, or shown to differ from the
        reference's token); (2) each open pair, at its first unsettled position, has one draw screened
        and the other certified against it; (3) the pairs still open before each row's first equal pair
        (up to the first open near one) are decoded completely in one screening pass, repeated until every
        row has an equal pair or no open one before it. Screened draws become references. Small
        vocabularies (`direct`) take `_pairs_by_position` instead, without references.
        """
        if self.direct and self.split:
            return self._pairs_by_position(latents)
        r, m, _ = latents.shape
        pairs, k = m // 2, self.patch_size
        device = latents.device
        hidden = self.decoder(latents.to(self.weight.dtype)).view(r, pairs, 2, k, -1)
        slots = (rows[:, None] * k + torch.arange(k, device=device)).view(r, 1, 1, k).expand(r, pairs, 2, k)
        tokens = torch.full((r, pairs, 2, k), -1, dtype=torch.long, device=device)
        differ = torch.zeros(r, pairs, k, dtype=torch.bool, device=device)
        known = memory.ceiling[slots].isfinite()
        if known.any():
            s = slots[known]
            found, away = self._against(hidden[known], memory.state[s], memory.top_idx[s], memory.ceiling[s],
                                        memory.token[s])
            tokens[known] = found
            off = torch.zeros_like(known)
            off[known] = away
            ref = memory.token[slots[:, :, 0]]
            differ |= ((tokens[:, :, 0] == ref) & off[:, :, 1]) | ((tokens[:, :, 1] == ref) & off[:, :, 0])
        same, differ = _compare(tokens, differ)
        index = torch.arange(pairs, device=device)
        # Pairs whose states nearly coincide are most likely equal: they are decoded whole at once (a second
        # screening call would cost ~30 positions' worth), and pairs after them are left for step (3).
        x, y = hidden[:, :, 0], hidden[:, :, 1]
        near = ((x - y).norm(dim=-1) <= self.near * x.norm(dim=-1)).all(-1)
        last = torch.where(near | same.all(-1), index, pairs).min(1, keepdim=True).values
        open_ = ~differ.any(-1) & ~same.all(-1) & (index <= last)
        if open_.any():
            row, pair = open_.nonzero(as_tuple=True)
            unsettled = ~same[row, pair]
            first_pos = torch.zeros_like(unsettled).scatter_(1, unsettled.long().argmax(1, keepdim=True), True)
            which, pos = (unsettled & (first_pos | near[row, pair, None])).nonzero(as_tuple=True)
            side = (tokens[row[which], pair[which], 0, pos] >= 0).long()  # screen the first draw unless known
            self._settle(hidden, tokens, differ, slots, memory, row[which], pair[which], side, pos)
        while True:  # (3): one screening pass settles every pair it takes, so this rarely loops
            same, differ = _compare(tokens, differ)
            equal = same.all(-1)
            first_equal = torch.where(equal, index, pairs).min(1).values
            open_ = ~equal & ~differ.any(-1) & (index < first_equal[:, None])
            # pairs after an open near pair are likely not needed (it is most likely equal)
            near_open = torch.where(open_ & near, index, pairs).min(1, keepdim=True).values
            open_ &= index <= near_open
            if not open_.any():
                break
            row, pair, side, pos = (open_[:, :, None, None] & (tokens < 0)).nonzero(as_tuple=True)
            self._settle(hidden, tokens, differ, slots, memory, row, pair, side, pos)
        found = first_equal < pairs
        chunk = tokens[torch.arange(r, device=device), first_equal.clamp(max=pairs - 1), 0]
        return torch.where(found, first_equal, -1), torch.where(found[:, None], chunk, 0)

    def _pairs_by_position(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`decode_pairs` for small vocabularies: the decoder's per-latent layers run for every draw, its
        per-position layers and the projection only where a pair is still equal on every earlier position
        (most pairs differ at their first position, so about one position in K is decoded)."""
        r, m, _ = latents.shape
        pairs, k = m // 2, self.patch_size
        trunk = decoder_trunk(self.decoder, latents.to(self.weight.dtype)).view(r, pairs, 2, k, -1)
        tokens = torch.zeros(r, pairs, 2, k, dtype=torch.long, device=latents.device)
        equal = torch.ones(r, pairs, dtype=torch.bool, device=latents.device)
        for pos in range(k):
            row, pair = equal.nonzero(as_tuple=True)
            if len(row) == 0:
                break
            hidden = decoder_tail(self.decoder, trunk[row, pair, :, pos])  # (N, 2, d)
            found = self.tokens_from_hidden(hidden.flatten(0, 1)).view(-1, 2)
            tokens[row, pair, :, pos] = found
            equal[row, pair] = found[:, 0] == found[:, 1]
        first = torch.where(equal.any(1), equal.long().argmax(1), -1)
        chunk = tokens[torch.arange(r, device=latents.device), first.clamp(min=0), 0]
        return first, torch.where((first >= 0)[:, None], chunk, 0)

    @torch.no_grad()
    def decode_distinct(self, latents: torch.Tensor, memory: "StreamMemory | None" = None,
                        rows: torch.Tensor | None = None):
        """Draws (R, M, l) -> (chunks (R, M, K), finish): what duplicate counts over each row's draws need.

        Small vocabularies decode a draw's position j only while its first j tokens equal another draw's
        of the row; from its first unshared position on it holds -1 - m (m its index: unique, so draws
        keep the duplicate counts and equal pairs of the full decode). `finish(row, draw)` -> those draws'
        full chunks (N, K). Other decoders decode everything (`decode_draws`)."""
        if not (self.direct and self.split):
            chunks = self.decode_draws(latents, memory, rows)
            return chunks, lambda row, draw: chunks[row, draw]
        r, m, _ = latents.shape
        trunk = decoder_trunk(self.decoder, latents.to(self.weight.dtype))  # (R, M, K, d)
        chunks = (-1 - torch.arange(m, device=latents.device)).view(1, m, 1).repeat(r, 1, self.patch_size)
        need = torch.ones(r, m, dtype=torch.bool, device=latents.device)
        for pos in range(self.patch_size):
            row, draw = need.nonzero(as_tuple=True)
            if len(row) == 0:
                break
            chunks[row, draw, pos] = self.tokens_from_hidden(decoder_tail(self.decoder, trunk[row, draw, pos]))
            need &= _shared(chunks[..., : pos + 1])

        def finish(row: torch.Tensor, draw: torch.Tensor) -> torch.Tensor:
            out = chunks[row, draw].clone()
            i, pos = (out < 0).nonzero(as_tuple=True)
            if len(i):
                out[i, pos] = self.tokens_from_hidden(decoder_tail(self.decoder, trunk[row[i], draw[i], pos]))
            return out

        return chunks, finish

    def _settle(self, hidden: torch.Tensor, tokens: torch.Tensor, differ: torch.Tensor, slots: torch.Tensor,
                memory: "StreamMemory", row: torch.Tensor, pair: torch.Tensor, side: torch.Tensor,
                pos: torch.Tensor) -> None:
        """Screen the draws (row, pair, side) at positions pos (in place into `tokens`), and certify the
        other draw of each pair there against it when that one is still unknown."""
        state = hidden[row, pair, side, pos]
        found, top_idx, ceiling = self._screen(state)
        tokens[row, pair, side, pos] = found
        memory.keep(slots[row, pair, side, pos], state, top_idx, ceiling, found)
        other = 1 - side
        o = tokens[row, pair, other, pos] < 0
        if o.any():
            got, away = self._against(hidden[row[o], pair[o], other[o], pos[o]], state[o], top_idx[o], ceiling[o],
                                      found[o])
            tokens[row[o], pair[o], other[o], pos[o]] = got
            differ[row[o], pair[o], pos[o]] |= away


def decoder_trunk(decoder, latents: torch.Tensor) -> torch.Tensor:
    """AEDecoder.forward up to its expansion: latents (..., l) -> per-position states (..., K, d). Split from
    `decoder_tail` so that positions can be finished one at a time (rows are processed independently, so
    the values are those of the whole forward)."""
    h = decoder.latent_to_hidden(latents)
    for layer in decoder.decoder_layers[: decoder.n_first]:
        h = layer(h)
    return decoder.expand_layer(h).unflatten(-1, (decoder.patch_size, -1))


def decoder_tail(decoder, h: torch.Tensor) -> torch.Tensor:
    """The rest of AEDecoder.forward: per-position states (..., d) -> final states (..., d)."""
    for layer in decoder.decoder_layers[decoder.n_first:]:
        h = layer(h)
    return decoder.norm(h)


def _prepack(matrix: torch.Tensor) -> torch.Tensor | None:
    """A copy of a bf16 (V, d) matrix laid out once for oneDNN's matmul, or None where that is not
    available (not a CPU tensor, no bf16 oneDNN kernels). A plain matmul re-lays the matrix out on every
    call, about 1.5 ms here (as much as screening 20 positions), and screening is called many times
    per chunk with few positions each."""
    if matrix.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return None
        packed = torch.ops.mkldnn._reorder_linear_weight(matrix, None)
        probe = matrix[:1]  # private ops: used only where they give the plain product on this build
        if not torch.equal(torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], ""), probe @ matrix.T):
            return None
        return packed
    except (AttributeError, RuntimeError, TypeError):  # absent, refused or with another signature elsewhere
        return None


def _shared(prefixes: torch.Tensor) -> torch.Tensor:
    """Prefixes (R, M, j) -> (R, M) bool: another of the row's M prefixes is the same (sort, compare
    neighbours)."""
    r, m, j = prefixes.shape
    order = torch.arange(m, device=prefixes.device).expand(r, m)
    for col in reversed(range(j)):  # lexicographic: stable sorts, least significant column first
        order = order.gather(1, prefixes[..., col].gather(1, order).argsort(dim=1, stable=True))
    ranked = prefixes.gather(1, order[..., None].expand(-1, -1, j))
    same = (ranked[:, 1:] == ranked[:, :-1]).all(-1)
    pad = same.new_zeros(r, 1)
    dup = torch.cat([pad, same], 1) | torch.cat([same, pad], 1)
    return torch.empty_like(dup).scatter_(1, order, dup)


def _compare(tokens: torch.Tensor, differ: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs' tokens (R, P, 2, K), -1 unknown -> (same (R, P, K): both known and equal; differ (R, P, K):
    certified different, now including positions where both are known and unequal)."""
    x, y = tokens[:, :, 0], tokens[:, :, 1]
    both = (x >= 0) & (y >= 0)
    return both & (x == y), differ | (both & (x != y))


class StreamMemory:
    """One screened reference draw per (row, chunk position), kept over the calls that sample one chunk
    so that later rounds' draws are certified without a new screening pass. An infinite ceiling marks
    a stream without a reference yet (nothing certifies against it)."""

    def __init__(self, decoder: ArgmaxDecoder, rows: int):
        streams, d = rows * decoder.patch_size, decoder.weight.shape[1]
        device = decoder.weight.device
        self.state = torch.zeros(streams, d, dtype=decoder.weight.dtype, device=device)
        self.top_idx = torch.zeros(streams, decoder.shortlist, dtype=torch.long, device=device)
        self.ceiling = torch.full((streams,), torch.inf, device=device)
        self.token = torch.full((streams,), -1, dtype=torch.long, device=device)

    def keep(self, slots: torch.Tensor, state: torch.Tensor, top_idx: torch.Tensor, ceiling: torch.Tensor,
             token: torch.Tensor) -> None:
        """Store references (and their exact tokens) for the slots that have none (the first one kept stays)."""
        offered = torch.arange(len(slots), device=slots.device)
        first = torch.full_like(self.ceiling, len(slots), dtype=torch.long).scatter_reduce(0, slots, offered, "amin")
        new = ~self.ceiling[slots].isfinite() & (first[slots] == offered)  # one reference per slot, consistently
        slots = slots[new]
        self.state[slots], self.top_idx[slots], self.ceiling[slots] = state[new], top_idx[new], ceiling[new]
        self.token[slots] = token[new]

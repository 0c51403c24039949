"""Cross-entropy of a linear output layer without the whole (tokens x vocabulary) logits.

At the paper's 128256-token vocabulary one micro-batch of 8 x 2048 tokens has 2.1e9 logits, 8.4 GB in
float32, and the plain path (`F.linear`, a float32 copy, `F.cross_entropy`, its gradient) holds several
tensors of that size at once. `linear_cross_entropy` walks the rows in chunks instead: each chunk's
logits give its share of the loss and, in the same pass, the gradient of the mean loss with respect
to them, (softmax - one-hot) / count, which is multiplied straight into the gradients of the hidden
states and of the weight. Backward then only scales those by the incoming gradient, so:

- the layer's three matrix products are computed once each (nothing is recomputed);
- the weight is not needed after the forward pass (under ZeRO-3 it may be released again);
- the extra memory is one chunk of logits plus a float32 gradient of the weight.

The loss and gradients are the plain path's up to float rounding (summation order). Chunking is chosen
per call by `resolve_chunk_rows`: "auto" keeps the plain path for small logits (the tiny presets keep
their exact numerics) and chunks above `AUTO_MIN_ELEMENTS`.

Only torch is imported here: this file travels with exported models as remote code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = {"cpu": 1 << 25, "cuda": 1 << 28}
"""Logits per chunk: 128 MiB of float32 on CPUs, 1 GiB on GPUs (other devices: the CPU's). Each chunk
also reads and writes the float32 weight gradient (vocabulary x d) once, so a GPU, with memory to spare
and that traffic to amortise, takes larger chunks."""
AUTO_MIN_ELEMENTS = 1 << 26
"""With "auto", logits of at most this many elements (256 MiB in float32) are still formed whole."""


def chunk_rows_for(vocab_size: int, device_type: str = "cpu") -> int:
    """Rows per chunk, a multiple of 64: on CPUs 1024 at a 32000-token vocabulary, 256 at 128256; on GPUs 8x."""
    budget = CHUNK_ELEMENTS.get(device_type, CHUNK_ELEMENTS["cpu"])
    return max(64, budget // vocab_size // 64 * 64)


def resolve_chunk_rows(setting: int | str, rows: int, vocab_size: int, device_type: str = "cpu") -> int:
    """Rows per chunk for `setting` ("auto" or an int; 0 = whole logits) at this many rows."""
    if setting == "auto":
        return chunk_rows_for(vocab_size, device_type) if rows * vocab_size > AUTO_MIN_ELEMENTS else 0
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise ValueError(f"ce_chunk_rows must be 'auto' or an int >= 0, got {setting!r}")
    return setting


def _chunk_pass(hidden, weight, targets, chunk_rows, ignore_index, want_grad, count_correct):
    """One pass over the row chunks: (loss sum, valid count, correct count, grad_hidden, grad_weight)."""
    count = (targets != ignore_index).sum()
    scale = 1.0 / count.clamp(min=1).to(torch.float32)
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device) if count_correct else None
    grad_hidden = torch.empty_like(hidden) if want_grad else None
    # Accumulated over chunks in float32 whatever the weight's dtype, cast once in backward.
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grad else None
    for start in range(0, hidden.shape[0], chunk_rows):
        h, t = hidden[start:start + chunk_rows], targets[start:start + chunk_rows]
        logits = F.linear(h, weight).float()
        valid = t != ignore_index
        safe = t.masked_fill(~valid, 0)
        picked = logits.gather(1, safe[:, None]).squeeze(1)
        if count_correct:
            correct += ((logits.argmax(-1) == t) & valid).sum()
        # Softmax in place of the logits (no second chunk-sized buffer): exp(x - max) / total.
        top = logits.amax(-1, keepdim=True)
        probs = logits.sub_(top).exp_()
        total = probs.sum(-1)
        loss_sum += ((top.squeeze(1) + total.log() - picked) * valid).sum()
        if want_grad:
            weights = valid.to(probs.dtype) * scale  # d(mean loss)/d(row loss); 0 on ignored rows
            probs.mul_((weights / total)[:, None]).scatter_add_(1, safe[:, None], -weights[:, None])
            g = probs.to(hidden.dtype)
            torch.mm(g, weight, out=grad_hidden[start:start + chunk_rows])
            if g.dtype == torch.float32:
                grad_weight.addmm_(g.T, h)
            else:
                grad_weight.add_(g.T @ h)  # a bf16 product added into float32 in one pass
    return loss_sum, count, correct, grad_hidden, grad_weight


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean CE with its gradients computed during the forward pass (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows, ignore_index, count_correct):
        loss_sum, count, correct, grad_hidden, grad_weight = _chunk_pass(
            hidden, weight, targets, chunk_rows, ignore_index, True, count_correct)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        if correct is None:
            correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        ctx.mark_non_differentiable(correct)
        return loss_sum / count.clamp(min=1), correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_h = grad_hidden * grad_loss.to(grad_hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_w = (grad_weight * grad_loss).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int,
                         ignore_index: int = -100, count_correct: bool = False):
    """Mean cross-entropy of logits `hidden @ weight.T` against `targets`, in float32, and the number of
    rows whose argmax is the target (a 0-dim long tensor; None unless `count_correct`).

    hidden (..., d), weight (V, d), targets (...). `chunk_rows` > 0 never forms more than that many rows
    of logits at once; 0 forms them whole (`F.linear` + `F.cross_entropy`, the plain path).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if chunk_rows <= 0:
        logits = F.linear(hidden, weight)
        loss = F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)
        if not count_correct:
            return loss, None
        with torch.no_grad():
            return loss, ((logits.argmax(-1) == targets) & (targets != ignore_index)).sum()
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        loss, correct = _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, ignore_index,
                                                         count_correct)
        return loss, correct if count_correct else None
    loss_sum, count, correct, _, _ = _chunk_pass(hidden, weight, targets, chunk_rows, ignore_index, False,
                                                 count_correct)
    return loss_sum / count.clamp(min=1), correct

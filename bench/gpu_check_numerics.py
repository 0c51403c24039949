"""gpu-check steps 1b and 2: which attention kernel the models run, and correctness on the device.

Tolerances (documented here, recorded in the JSON beside every measured value; `rel_rms` is
||a - b|| / ||b|| over all elements):

- bf16 forward against fp32 (same weights, same inputs): logits / hidden states rel_rms <= 2e-2 and the
  loss within 2e-2 relative. bf16 keeps 8 bits of mantissa (rounding 2^-9 = 2e-3 per operation) and
  the errors of a few dozen layers add up to about 1e-2; a wrong kernel or cast gives O(1).
- fp32 on the device against fp32 on the CPU (TF32 off): the loss within 1e-4 relative and outputs
  rel_rms <= 1e-4; only the summation order differs (1e-6 or less per operation).
- attention kernels against the math backend in fp32: output and input gradients rel_rms <= 1e-2 for
  bf16 inputs (the output itself is rounded to bf16, 2e-3).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
import torch.nn.functional as F

BF16_TOL = 2e-2
DEVICE_TOL = 1e-4
KERNEL_TOL = 1e-2
ATTENTION_OPS = (  # profiler op name -> kernel, most specific first
    ("flash_attn::", "flash_attention_2 (flash-attn)"),  # flash-attn's own ops (SDPA's are aten::)
    ("_scaled_dot_product_flash_attention_for_cpu", "sdpa: flash (cpu)"),
    ("_scaled_dot_product_flash_attention", "sdpa: flash"),
    ("_scaled_dot_product_efficient_attention", "sdpa: memory-efficient"),
    ("_scaled_dot_product_cudnn_attention", "sdpa: cudnn"),
    ("_scaled_dot_product_attention_math", "sdpa: math"),
)


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.detach().double()
    b = b.detach().to(a.device).double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def rel(a: float, b: float) -> float:
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-30)


@contextmanager
def cpu_randomness(seed: int):
    """`torch.rand`/`torch.randn` drawn from one CPU generator and moved to the requested device, so a
    model on the GPU and its copy on the CPU consume the same random numbers (CALM's head noise and
    the energy loss's target samples; CUDA's generator gives other numbers for the same seed)."""
    gen = torch.Generator().manual_seed(seed)
    real = {"rand": torch.rand, "randn": torch.randn}

    def drawing(fn):
        def draw(*size, device=None, dtype=None, generator=None, **kwargs):
            out = fn(*size, generator=gen, dtype=dtype or torch.float32, **kwargs)
            return out if device is None else out.to(device)
        return draw

    torch.rand, torch.randn = drawing(real["rand"]), drawing(real["randn"])
    try:
        yield
    finally:
        torch.rand, torch.randn = real["rand"], real["randn"]


def attention_kernel(model, ids: torch.Tensor) -> tuple[str, list[str]]:
    """The attention kernel a forward pass actually ran (from the profiler's op names) and the ops seen."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ids.is_cuda else [])
    with torch.no_grad(), profile(activities=activities) as prof:
        model(input_ids=ids)
    names = sorted({e.key for e in prof.key_averages()
                    if any(marker in e.key for marker, _ in ATTENTION_OPS) or "attention" in e.key.lower()})
    for marker, kernel in ATTENTION_OPS:
        if any(marker in name for name in names):
            return kernel, names
    return "unknown", names


def step_attention(model_kwargs: dict, device: torch.device, seq: int) -> list[dict]:
    """Step 1b: CALM and the baseline built as training builds them in bf16 (`build_model` picks the
    kernel; two layers suffice): the kernel picked and the one a causal forward actually ran. On CUDA
    flash attention (FlashAttention-2 or SDPA's flash backend) is required."""
    from pretrain.stages import build_model

    rows = []
    for name in ("calm", "baseline"):
        with torch.device(device):
            model = build_model(name, dict(model_kwargs[name], num_hidden_layers=2), device=device,
                                dtype=torch.bfloat16).train()
        if name == "calm":
            model.ae_model.float()
        ids = torch.randint(0, model.config.vocab_size, (2, seq), device=device)
        chosen = model.config._attn_implementation
        kernel, ops = attention_kernel(model, ids)
        flash = "flash" in kernel and (device.type == "cpu" or "cpu" not in kernel)
        rows.append({"check": f"attention {name} bf16", "value": f"{chosen} -> {kernel}", "ok": flash,
                     "detail": {"attn_implementation": chosen, "kernel": kernel, "ops": ops}})
        del model
    return rows


def _ae_outputs(model, ids):
    out = model(input_ids=ids)
    return out.logits, out.loss


def _baseline_outputs(model, ids):
    out = model(input_ids=ids, labels=ids)
    return out.logits, out.loss


def _calm_outputs(model, ids):
    with cpu_randomness(0):
        hidden, _ = model.backbone(model.chunk_embeddings(ids))
        return hidden, model(input_ids=ids).loss


OUTPUTS = {"autoencoder": _ae_outputs, "calm": _calm_outputs, "baseline": _baseline_outputs}


def _cast(model, device, dtype):
    model = copy.deepcopy(model).to(device, dtype).eval()
    if hasattr(model, "ae_model"):
        model.ae_model.float()  # CALM keeps its frozen autoencoder in float32 at any precision
    return model


@torch.no_grad()
def step_correctness(models: dict, device: torch.device, ids: dict) -> list[dict]:
    """Step 2a/b: each model's bf16 forward against fp32 on the device; fp32 on the device against
    fp32 on the CPU for the autoencoder and CALM's energy loss (TF32 off)."""
    rows = []
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for name, model in models.items():
            x = ids[name].to(device)
            ref_out, ref_loss = OUTPUTS[name](_cast(model, device, torch.float32), x)
            out, loss = OUTPUTS[name](_cast(model, device, torch.bfloat16), x)
            err, lerr = rel_rms(out, ref_out), rel(loss, ref_loss)
            rows.append({"check": f"{name} bf16 vs fp32", "value": f"rel_rms {err:.1e}, loss {lerr:.1e}",
                         "ok": err <= BF16_TOL and lerr <= BF16_TOL, "detail": {"rel_rms": err, "loss_rel": lerr,
                                                                                 "tolerance": BF16_TOL}})
            if name == "baseline":
                continue
            cpu_out, cpu_loss = OUTPUTS[name](_cast(model, "cpu", torch.float32), x.cpu())
            err, lerr = rel_rms(ref_out, cpu_out), rel(ref_loss, cpu_loss)
            rows.append({"check": f"{name} {device.type} vs cpu fp32", "value": f"rel_rms {err:.1e}, loss {lerr:.1e}",
                         "ok": err <= DEVICE_TOL and lerr <= DEVICE_TOL,
                         "detail": {"rel_rms": err, "loss_rel": lerr, "loss": float(ref_loss),
                                    "cpu_loss": float(cpu_loss), "tolerance": DEVICE_TOL}})
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return rows


def _attention_grads(fn, q, k, v, dout):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return [out.detach()] + [t.grad for t in (q, k, v)]


def step_kernels(device: torch.device, shape: tuple[int, int, int, int]) -> list[dict]:
    """Step 2c: bf16 causal attention through the flash kernels (SDPA's flash backend; flash-attn's
    when installed) against the math backend in fp32: outputs and the gradients of q, k, v."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(shape, generator=gen).to(device, torch.bfloat16) for _ in range(4))

    def sdpa(backend, dtype):
        def fn(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), is_causal=True)
        return fn

    ref = _attention_grads(sdpa(SDPBackend.MATH, torch.float32), q, k, v, dout.float())
    kernels = {"sdpa flash bf16": sdpa(SDPBackend.FLASH_ATTENTION, torch.bfloat16)}
    if device.type == "cuda":
        from pretrain.models.attention import flash_attn_importable

        if flash_attn_importable():
            from flash_attn import flash_attn_func

            kernels["flash-attn bf16"] = lambda q, k, v: flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)
    rows = []
    for name, fn in kernels.items():
        got = _attention_grads(fn, q, k, v, dout)
        errs = [rel_rms(g, r) for g, r in zip(got, ref)]
        errors = "/".join(f"{e:.1e}" for e in errs)
        rows.append({"check": f"{name} vs math fp32", "value": f"rel_rms out/dq/dk/dv {errors}",
                     "ok": max(errs) <= KERNEL_TOL, "detail": {"rel_rms": errs, "shape": list(shape),
                                                               "tolerance": KERNEL_TOL}})
    return rows


def _ce_grads(hidden, weight, targets, rows):
    from pretrain.models.losses import linear_cross_entropy

    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss, _ = linear_cross_entropy(h, w, targets, rows)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def step_chunked_ce(device: torch.device, shape: tuple[int, int, int]) -> list[dict]:
    """Step 2d: the chunked output layer (`pretrain.models.losses`) against whole logits on the device:
    loss and gradients within 1e-5 relative in fp32; in bf16 within BF16_TOL of the fp32 result, as the
    whole-logits path is (its weight gradient is rounded to bf16 once per chunk)."""
    from pretrain.models.losses import chunk_rows_for

    rows_n, d, vocab = shape
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows_n, d, generator=gen).to(device)
    weight = (torch.randn(vocab, d, generator=gen) * d ** -0.5).to(device)
    targets = torch.randint(0, vocab, (rows_n,), generator=gen).to(device)
    chunk = min(chunk_rows_for(vocab, device.type), max(1, rows_n // 3))  # the device's own chunking, >= 3 chunks
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref = _ce_grads(hidden, weight, targets, 0)
        results = {"fp32": (_ce_grads(hidden, weight, targets, chunk), 1e-5)}
        low = hidden.bfloat16(), weight.bfloat16()
        results["bf16"] = (_ce_grads(*low, targets, chunk), BF16_TOL)
        results["bf16 whole"] = (_ce_grads(*low, targets, 0), BF16_TOL)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    out = []
    for name, (got, tol) in results.items():
        errs = [rel(got[0], ref[0]), rel_rms(got[1], ref[1]), rel_rms(got[2], ref[2])]
        errors = "/".join(f"{e:.1e}" for e in errs)
        out.append({"check": f"chunked CE {name} vs whole fp32", "value": f"loss/dh/dW {errors}",
                    "ok": max(errs) <= tol, "detail": {"errors": errs, "tolerance": tol, "chunk_rows": chunk,
                                                       "shape": list(shape)}})
    return out

"""The ``flex`` backend checks itself: before its first use for a (device, dtype, head dim, block size, CPU code
generation) it runs a small block-sparse problem through the same compiled call and compares the result with dense
float64 SDPA under the same token mask. A disagreement (or a compile failure) is cached and returned as the reason
the backend cannot run, so an explicit ``flex`` raises with it and ``auto`` skips flex and logs it.

Why: compiled FlexAttention's output depends on code that inductor generates for the machine (on CPU, for its
vector width), and one such path was silently wrong on AVX2-only CPUs (see :mod:`ultragen.attention.flex`). The
check costs one extra compile of a tiny shape per key and process.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ultragen.attention import flex
from ultragen.policy import AttentionPlan

# the self-check's block table: rows of different lengths, out-of-order gaps, the diagonal not always included
CHECK_TABLE = ((0,), (0, 1, 3), (2, 3), (0, 1, 2, 3))
CHECK_HEADS = 2
TOLERANCE = {torch.float32: 1e-3}  # max abs error against float64 for unit-normal inputs (outputs are below ~3)
LOW_PRECISION_TOLERANCE = 5e-2  # bf16, fp16 (their rounding alone gives about 4e-3)

_VERDICTS: dict[tuple, str | None] = {}  # check key -> None (agrees) or the reason it does not


def flex_disagrees(q: torch.Tensor, plan: AttentionPlan) -> str | None:
    """None when compiled FlexAttention agrees with the reference on a small problem of q's device, dtype and head
    dim and the plan's block size (checked once per process and key), else why it cannot be used."""
    key = (str(q.device), q.dtype, q.shape[-1], plan.block_tokens, _code_generation(q.device))
    if key not in _VERDICTS:
        _VERDICTS[key] = _self_check(q.device, q.dtype, q.shape[-1], plan.block_tokens, key[-1])
    return _VERDICTS[key]


def _code_generation(device: torch.device) -> str:
    """What inductor compiles for on this device: on CPU the vector ISA (e.g. avx2, avx512), which
    ``ATEN_CPU_CAPABILITY`` and ``torch._inductor.config.cpp.simdlen`` can change."""
    if device.type != "cpu":
        return device.type
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        return str(pick_vec_isa()) or "no vector ISA"
    except Exception as error:  # a private API: a torch that moves it must not make flex unusable
        return f"unknown ({type(error).__name__})"


def _self_check(device: torch.device, dtype: torch.dtype, head_dim: int, block_tokens: int, codegen: str) -> str | None:
    n, b = len(CHECK_TABLE), block_tokens
    counts = torch.tensor([len(row) for row in CHECK_TABLE])
    indices = torch.tensor([row + (-1,) * (n - len(row)) for row in CHECK_TABLE])
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, CHECK_HEADS, n * b, head_dim, generator=gen).to(dtype) for _ in range(3))
    table = torch.zeros(n, n, dtype=torch.bool)
    for row, cols in enumerate(CHECK_TABLE):
        table[row, list(cols)] = True
    token_mask = table.repeat_interleave(b, 0).repeat_interleave(b, 1)
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=token_mask)
    where = (f"a {n}x{n}-block self-check ({b}-token blocks, head dim {head_dim}, {dtype}, {device}, "
             f"inductor code for {codegen}, torch {torch.__version__})")
    fix = "use backend 'reference' (CLI: --backend reference) or 'auto', which picks a backend that works here"
    try:
        mask = flex.full_block_mask(counts, indices, n, b, device)
        got = flex.flex_call(q.to(device), k.to(device), v.to(device), mask, b).double().cpu()
    except Exception as error:
        return f"compiled FlexAttention failed on {where}: {_describe(error)}; {fix}"
    tolerance = TOLERANCE.get(dtype, LOW_PRECISION_TOLERANCE)
    bad = int((~got.isfinite()).sum())
    err = (got - expected).abs().max().item() if bad == 0 else math.inf
    if bad or err > tolerance:
        what = f"{bad} of {got.numel()} outputs not finite" if bad else f"max abs error {err:.2e} > {tolerance:g}"
        return f"compiled FlexAttention disagreed with the reference on {where}: {what}; {fix}"
    return None


def _describe(error: BaseException) -> str:
    """One line for an exception and the one it wraps (torch.compile wraps inductor's error in its own)."""
    text = f"{type(error).__name__}: {_first_line(error)}"
    inner = getattr(error, "inner_exception", None) or error.__cause__
    if inner is not None and type(inner).__name__ not in text:
        text += f" <- {type(inner).__name__}: {_first_line(inner)}"
    return text


def _first_line(error: BaseException) -> str:
    lines = (line.strip() for line in str(error).splitlines())
    return next((line[:160] for line in lines if line and not line.endswith("raised:")), "(no message)")

"""The ``triton`` and ``triton-int8`` backends: our own block-sparse forward kernels (inference only).

``triton``: bf16/fp16 Q.K^T and P.V on the tensor cores, fp32 accumulators, online softmax in base 2; one program
per (query block, batch*head) walks the plan's key-block list of that query block. With ``KernelConfig.q_split``
(the head-dim-128 default) the program holds the block as two halves that share each K/V tile: both score
matmuls are issued before either softmax, so one half's asynchronous matmul runs under the other half's softmax.

``triton-int8`` (SageAttention-style, approximate): K is smoothed by subtracting a per-(batch, head) mean over
tokens (exact: it shifts every score of a query row by the same amount, and softmax ignores that), then Q and K
are quantized to int8 with one scale per 128-token block (per half query block of Q with ``q_split``); Q.K^T runs as an
int8 dot with int32 accumulation, read as fp32 by an integer add (exact, and off the special-function pipe that
exp2 needs), and P.V as fp8 e4m3 (P scaled to [0, 448], V scaled per channel). The quantization pre-pass of K and
V is part of the call.

Requires CUDA, triton, bf16 or fp16 inputs, head dim 64 or 128, and a plan block of 64 or 128 tokens.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, replace

import torch

from ultragen.policy import AttentionPlan

HEAD_DIMS = (64, 128)
BLOCKS = (64, 128)
DTYPES = (torch.bfloat16, torch.float16)
INT32_ELEMENTS = 2**31  # (B, H) offsets are int64 in the kernels; token x stride + dim offsets are int32
K_MEAN_STRIDE = 8  # the smoothing mean is taken over every 8th token: any per-head constant keeps softmax exact


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of one kernel; ``block_n`` must divide the plan block."""

    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3
    use_tma: bool = False  # triton only (whole-block programs); triton-int8 ignores it
    v_fp8: bool = True  # triton-int8 only: P.V in fp8 (else in V's dtype)
    q_split: bool = False  # two half query blocks per program sharing each K/V tile (not with use_tma)

    def __post_init__(self) -> None:
        if self.q_split and self.use_tma:
            raise ValueError("KernelConfig(q_split=True, use_tma=True): the split-query programs read through "
                             "pointers; set use_tma=False (or q_split=False for the TMA whole-block program)")


# Chosen from the H100 runs of bench/gpu_check_attention.py; keyed by (variant, head_dim). Head dim 128: the
# split-query programs. bf16: 3.69 vs 3.79 ms at 4K in the sweep (bench/results/attention-sweep-q-split-*.json); at
# 8K about 3 % faster than the whole-block program's other measurements (that sweep's 21.2 ms for it is an outlier);
# as fast or faster at the other sizes (attention-by-size-*.json, repeats differ by up to 8 %). int8: 3.68 ms at 4K;
# the whole-block program with 128-key tiles spills since the integer-add score conversion (4.3 ms, 3.8-3.9 ms
# before it), and at 1024x1024 the whole-block 64-key program is faster (0.50 vs 0.58 ms). Head dim 64 (small
# models) was not swept and keeps the first sweep's whole-block programs with 3 stages.
DEFAULT_CONFIGS: dict[tuple[str, int], KernelConfig] = {
    ("bf16", 128): KernelConfig(block_n=64, num_warps=4, num_stages=2, q_split=True),
    ("bf16", 64): KernelConfig(block_n=64, num_warps=4, num_stages=3),
    ("int8", 128): KernelConfig(block_n=128, num_warps=4, num_stages=2, q_split=True),
    ("int8", 64): KernelConfig(block_n=128, num_warps=4, num_stages=3),
}

_ROW_ORDER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # plan -> {device: heaviest-first order}


def triton_missing() -> str | None:
    """None when triton imports, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"triton is not installed ({error}); it ships with CUDA builds of torch"
    return None


def why_not_triton(q: torch.Tensor, plan: AttentionPlan) -> str | None:
    """None when the triton kernels can run these inputs, else the reason."""
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} unsupported; cast q, k, v to torch.bfloat16 or torch.float16"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head dim {q.shape[-1]} unsupported; the kernels take {HEAD_DIMS}"
    if plan.block_tokens not in BLOCKS:
        return f"plan block of {plan.block_tokens} tokens unsupported; build the layout with block_tokens in {BLOCKS}"
    if reason := int32_overflow(plan.layout.seq_tokens, q.shape[1], q.shape[-1]):
        return reason
    if q.device.type != "cuda":
        return f"needs a CUDA device, got {q.device.type!r}"
    if reason := triton_missing():
        return reason
    if q.stride(-1) != 1:
        return "the last dim of q, k, v must be contiguous (stride 1); call .contiguous()"
    return None


def int32_overflow(seq_tokens: int, heads: int, head_dim: int) -> str | None:
    """None when every in-(batch, head) offset fits the kernels' int32 arithmetic, else why not. The largest such
    offset is a token's row times the token stride (heads x head_dim when q, k, v are (B, S, H, D) views, as a FLUX
    block passes them) plus the dim: below seq_tokens x heads x head_dim, which must stay below 2^31."""
    if seq_tokens * heads * head_dim >= INT32_ELEMENTS:
        return (f"{seq_tokens} tokens x {heads} heads x {head_dim}: token offsets would overflow the kernel's "
                f"int32 arithmetic (an image above about 13K px a side); use backend 'flex' or a cascade")
    return None


def _row_order(plan: AttentionPlan, device: torch.device, q_blocks: int) -> torch.Tensor:
    """(q_blocks,) int32: the leading ``q_blocks`` query blocks, most key blocks first (stable: equal rows keep
    sequence order), so the long rows start early instead of forming a tail."""
    per_plan = _ROW_ORDER.setdefault(plan, {})
    key = (str(device), q_blocks)
    if key not in per_plan:
        counts = plan.kv_counts[:q_blocks].long()
        if int(counts.min()) < 1:
            raise ValueError("every query block of the plan must read at least one key block; check the policy")
        per_plan[key] = torch.argsort(-counts, stable=True).to(torch.int32).to(device)
    return per_plan[key]


def _config(variant: str, head_dim: int, plan: AttentionPlan, config: KernelConfig | None) -> KernelConfig:
    config = config or DEFAULT_CONFIGS[(variant, head_dim)]
    if plan.block_tokens % config.block_n:
        config = replace(config, block_n=plan.block_tokens)
    return config


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: AttentionPlan,
    config: KernelConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse attention, bf16/fp16. q: (B, H, Sq, D) (the first Sq tokens, whole blocks), k, v: (B, H, S, D)
    -> (B, H, Sq, D); ``out`` (like q; any strides with a contiguous last dim) is written in place when given."""
    from ultragen.attention import triton_kernels as kernels

    batch, heads, rows, dim = q.shape
    seq = k.shape[-2]
    config = _config("bf16", dim, plan, config)
    out = torch.empty_like(q) if out is None else out
    counts, indices = plan.on(q.device, "kv_counts"), plan.on(q.device, "kv_indices")
    order = _row_order(plan, q.device, rows // plan.block_tokens)
    grid = (len(order), batch * heads)
    scale = 1.0 / math.sqrt(dim) * math.log2(math.e)
    tensors = (q, k, v, out)
    if config.use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        flat = [t.contiguous().view(-1, dim) for t in tensors[:3]]
        out_flat = out if out.is_contiguous() else torch.empty(q.shape, dtype=q.dtype, device=q.device)
        flat.append(out_flat.view(-1, dim))
        blocks = (plan.block_tokens, config.block_n, config.block_n, plan.block_tokens)
        tensors = tuple(TensorDescriptor.from_tensor(t, [rows, dim]) for t, rows in zip(flat, blocks))
    strides = [s for t in (q, k, v, out) for s in t.stride()[:3]]
    if config.q_split:
        kernels.bsa_fwd_split[grid](
            q, k, v, out, counts, indices, order, scale, *strides, heads, indices.shape[1],
            BLOCK=plan.block_tokens, BLOCK_N=config.block_n, HEAD_DIM=dim,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
        return out
    kernels.bsa_fwd[grid](
        *tensors, counts, indices, order, scale, *strides, heads, rows, seq, indices.shape[1],
        BLOCK=plan.block_tokens, BLOCK_N=config.block_n, HEAD_DIM=dim, USE_TMA=config.use_tma,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if config.use_tma and out_flat is not out:
        out.copy_(out_flat)
    return out


def quantize_kv(
    k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, v_fp8: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The int8 pre-pass. k, v: (B, H, S, D) -> (k8 (B*H, S, D) int8, k_scale (B*H, n_blocks) fp32,
    v8 (B*H, D, S) fp8 e4m3 or ``v`` itself, v_scale (B*H, D) fp32 with v = v8 * v_scale)."""
    from ultragen.attention import triton_kernels as kernels

    batch, heads, seq, dim = k.shape
    bh = batch * heads
    k_shift = k[:, :, ::K_MEAN_STRIDE].float().mean(dim=2).reshape(bh, dim).contiguous()
    if v_fp8:
        low, high = torch.aminmax(v, dim=2)
        v_scale = (torch.maximum(-low.float(), high.float()).clamp(min=1e-20) / 448.0).reshape(bh, dim).contiguous()
        v8 = torch.empty(bh, dim, seq, dtype=torch.float8_e4m3fn, device=k.device)
    else:
        v_scale = torch.ones(bh, dim, device=k.device)
        v8 = v
    k8 = torch.empty(bh, seq, dim, dtype=torch.int8, device=k.device)
    k_scale = torch.empty(bh, plan.n_blocks, dtype=torch.float32, device=k.device)
    kernels.smooth_quantize_kv[(plan.n_blocks, bh)](
        k, v, k_shift, v_scale, k8, k_scale, v8, *k.stride()[:3], *v.stride()[:3], heads, seq, plan.n_blocks,
        BLOCK=plan.block_tokens, HEAD_DIM=dim, V_FP8=v_fp8, num_warps=8,
    )
    return k8, k_scale, v8, v_scale


def triton_int8_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: AttentionPlan,
    config: KernelConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Approximate block-sparse attention (int8 Q.K^T, fp8 P.V). Shapes as :func:`triton_attention`."""
    from ultragen.attention import triton_kernels as kernels

    batch, heads, rows, dim = q.shape
    seq = k.shape[-2]
    config = _config("int8", dim, plan, config)
    out = torch.empty_like(q) if out is None else out
    k8, k_scale, v_in, v_scale = quantize_kv(k, v, plan, config.v_fp8)
    counts, indices = plan.on(q.device, "kv_counts"), plan.on(q.device, "kv_indices")
    order = _row_order(plan, q.device, rows // plan.block_tokens)
    scale = 1.0 / math.sqrt(dim) * math.log2(math.e)
    kernels.bsa_fwd_int8[(len(order), batch * heads)](
        q, k8, k_scale, v_in, v_scale, out, counts, indices, order, scale,
        *q.stride()[:3], *v.stride()[:3], *out.stride()[:3], heads, seq, indices.shape[1], plan.n_blocks,
        BLOCK=plan.block_tokens, BLOCK_N=config.block_n, HEAD_DIM=dim, V_FP8=config.v_fp8, Q_SPLIT=config.q_split,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out

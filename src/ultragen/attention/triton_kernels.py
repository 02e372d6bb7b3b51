"""Triton kernels of the block-sparse forward (imported lazily by :mod:`ultragen.attention.triton_bsa`).

One program computes one query block (``BLOCK`` rows, the plan's block) of one (batch, head): it walks the
block's key-block list ``indices[row, :counts[row]]`` in ``BLOCK_N``-token steps with an online softmax in base 2
(the softmax scale is pre-multiplied by log2(e)) and fp32 accumulators. ``order`` lists the query blocks heaviest
first, so the few long rows (text, guide) start early instead of forming a tail. ``bsa_fwd_split`` and
``bsa_fwd_int8(Q_SPLIT=True)`` hold the query block as two halves instead (see ``triton_bsa``).

Each tensor argument is either a plain pointer (with strides) or, when ``USE_TMA``, a host-built
``TensorDescriptor`` over the 2D view (batch*heads*tokens, head_dim), read by the Hopper bulk-copy engine.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _softmax_step(qk, m_i, l_i, acc, qk_scale):
    """One online-softmax update of a row tile: qk (R, BLOCK_N) fp32 scores -> p (R, BLOCK_N), the new max and
    sum, and the rescaled accumulator (R, HEAD_DIM)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    return p, m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None]


@triton.jit
def bsa_fwd(
    Q, K, V, O,
    counts, indices, order,
    qk_scale,  # 1/sqrt(D) * log2(e)
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    H, S_Q, S, kv_width,
    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr,
):
    row = tl.load(order + tl.program_id(0))
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = row * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    seq_row = bh * S  # first key row of this (batch, head) in the 2D descriptor views of K and V
    q_row = bh * S_Q + row * BLOCK  # ... and of this query block in those of Q and O
    if USE_TMA:
        q = Q.load([q_row, 0])
    else:
        q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :])

    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    SUB: tl.constexpr = BLOCK // BLOCK_N
    n_steps = tl.load(counts + row) * SUB
    for step in range(n_steps):
        kv_block = tl.load(indices + row * kv_width + step // SUB)
        start = kv_block * BLOCK + (step % SUB) * BLOCK_N
        if USE_TMA:
            k = K.load([seq_row + start, 0])
        else:
            k = tl.load(K + b64 * stride_kb + h64 * stride_kh + (start + offs_n)[:, None] * stride_ks + offs_d[None, :])
        p, m_i, l_i, acc = _softmax_step(tl.dot(q, k.T), m_i, l_i, acc, qk_scale)
        if USE_TMA:
            v = V.load([seq_row + start, 0])
        else:
            v = tl.load(V + b64 * stride_vb + h64 * stride_vh + (start + offs_n)[:, None] * stride_vs + offs_d[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc)
    out = (acc / l_i[:, None]).to(q.dtype)
    if USE_TMA:
        O.store([q_row, 0], out)
    else:
        tl.store(O + b64 * stride_ob + h64 * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :], out)


@triton.jit
def smooth_quantize_kv(
    K, V, k_shift, v_scale, K8, k_scale, V8,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    H, S, n_blocks,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, V_FP8: tl.constexpr,
):
    """One token block of one (batch, head): K8 = round((K - shift) / s) int8 with s = amax / 127 per block
    (written to k_scale[bh, blk]); V to fp8 e4m3 as V / v_scale (per channel), stored transposed (bh, D, S)."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_s = blk * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + offs_s[:, None] * stride_ks
                + offs_d[None, :]).to(tl.float32)
    k = k - tl.load(k_shift + bh * HEAD_DIM + offs_d)[None, :]
    scale = tl.maximum(tl.max(tl.max(tl.abs(k), 1), 0), 1e-20) / 127.0
    k = k / scale
    k8 = tl.where(k >= 0, k + 0.5, k - 0.5).to(tl.int8)  # round half away from zero; |k| <= 127
    out_rows = bh.to(tl.int64) * S + offs_s
    tl.store(K8 + out_rows[:, None] * HEAD_DIM + offs_d[None, :], k8)
    tl.store(k_scale + bh * n_blocks + blk, scale)
    if V_FP8:
        v = tl.load(V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + offs_s[:, None] * stride_vs
                    + offs_d[None, :]).to(tl.float32)
        v = v / tl.load(v_scale + bh * HEAD_DIM + offs_d)[None, :]
        v8 = tl.trans(v.to(tl.float8e4nv))  # (HEAD_DIM, BLOCK): fp8 wgmma wants the reduction dim contiguous
        cols = bh.to(tl.int64) * HEAD_DIM + offs_d
        tl.store(V8 + cols[:, None] * S + offs_s[None, :], v8)


@triton.jit
def _quantize_q(q, qk_scale):
    """(R, D) bf16/fp16 query rows -> (R, D) int8 with one scale, and that scale times ``qk_scale``."""
    qf = q.to(tl.float32)
    q_scale = tl.maximum(tl.max(tl.max(tl.abs(qf), 1), 0), 1e-20) / 127.0
    qf = qf / q_scale
    return tl.where(qf >= 0, qf + 0.5, qf - 0.5).to(tl.int8), q_scale * qk_scale


@triton.jit
def _int8_softmax_step(s, s_scale, m_i, l_i, acc, P_LOG2_SHIFT: tl.constexpr):
    """Online-softmax update from exact int32 scores s (R, BLOCK_N) = q8 . k8^T; the log2-domain score is
    s * s_scale. |s| < 2^22 (127 * 127 * HEAD_DIM), so the bits of s + 0x4B400000 read as the float 1.5 * 2^23 + s
    exactly: an integer add instead of a conversion, which shares the slow pipe with exp2. The offset folds into
    the per-row bias. P comes out scaled by 2^P_LOG2_SHIFT (the fp8 range); l_i carries it, so it cancels."""
    f = (s + 0x4B400000).to(tl.float32, bitcast=True)
    m_new = tl.maximum(m_i, (tl.max(f, 1) - 12582912.0) * s_scale)
    p = tl.math.exp2(f * s_scale - (m_new + (12582912.0 * s_scale - P_LOG2_SHIFT))[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    return p, m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None]


@triton.jit
def bsa_fwd_int8(
    Q, K8, k_scale, V, v_scale, O,
    counts, indices, order,
    qk_scale,  # 1/sqrt(D) * log2(e)
    stride_qb, stride_qh, stride_qs,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    H, S, kv_width, n_blocks,
    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, V_FP8: tl.constexpr,
    Q_SPLIT: tl.constexpr,
):
    """SageAttention-style: int8 Q.K^T (Q quantized here per query block, K by ``smooth_quantize_kv``), then
    P.V with P in [0, 448] as fp8 e4m3 against the fp8 V (``V_FP8``; V is then (bh, D, S)) or in V's dtype.
    ``Q_SPLIT``: the query block as two halves (each with its own Q scale) that share every K/V tile, so one
    half's asynchronous matmul can run under the other half's softmax."""
    row = tl.load(order + tl.program_id(0))
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    ROWS: tl.constexpr = BLOCK // 2 if Q_SPLIT else BLOCK
    offs_m = row * BLOCK + tl.arange(0, ROWS)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs)
    out_dtype = q.dtype
    q8, q_scale = _quantize_q(q, qk_scale)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    if Q_SPLIT:
        q8_b, q_scale_b = _quantize_q(tl.load(q_ptrs + ROWS * stride_qs), qk_scale)
        m_b = tl.full([ROWS], float("-inf"), dtype=tl.float32)
        l_b = tl.zeros([ROWS], dtype=tl.float32)
        acc_b = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)

    k_rows = K8 + bh.to(tl.int64) * S * HEAD_DIM
    if V_FP8:
        v_base = V + bh.to(tl.int64) * HEAD_DIM * S
        P_SHIFT: tl.constexpr = 8.807354922057604  # log2(448): P in [0, 448], the e4m3 range
        p_dtype = tl.float8e4nv
    else:
        v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
        P_SHIFT: tl.constexpr = 0.0
        p_dtype = out_dtype
    SUB: tl.constexpr = BLOCK // BLOCK_N
    n_steps = tl.load(counts + row) * SUB
    for step in range(n_steps):
        kv_block = tl.load(indices + row * kv_width + step // SUB)
        start = kv_block * BLOCK + (step % SUB) * BLOCK_N
        k8 = tl.load(k_rows + (start + offs_n)[:, None] * HEAD_DIM + offs_d[None, :]).T
        ks = tl.load(k_scale + bh * n_blocks + kv_block)
        s = tl.dot(q8, k8, out_dtype=tl.int32)
        if Q_SPLIT:
            s_b = tl.dot(q8_b, k8, out_dtype=tl.int32)
        p, m_i, l_i, acc = _int8_softmax_step(s, q_scale * ks, m_i, l_i, acc, P_SHIFT)
        if V_FP8:
            v = tl.load(v_base + offs_d[:, None] * S + (start + offs_n)[None, :]).T  # (BLOCK_N, HEAD_DIM) fp8
        else:
            v = tl.load(v_base + (start + offs_n)[:, None] * stride_vs + offs_d[None, :])
        acc = tl.dot(p.to(p_dtype), v, acc)
        if Q_SPLIT:
            p_b, m_b, l_b, acc_b = _int8_softmax_step(s_b, q_scale_b * ks, m_b, l_b, acc_b, P_SHIFT)
            acc_b = tl.dot(p_b.to(p_dtype), v, acc_b)
    o_ptrs = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    v_col_scale = tl.load(v_scale + bh * HEAD_DIM + offs_d)[None, :]  # ones unless V_FP8
    tl.store(o_ptrs, (acc * v_col_scale / l_i[:, None]).to(out_dtype))
    if Q_SPLIT:
        tl.store(o_ptrs + ROWS * stride_os, (acc_b * v_col_scale / l_b[:, None]).to(out_dtype))


@triton.jit
def bsa_fwd_split(
    Q, K, V, O,
    counts, indices, order,
    qk_scale,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    H, kv_width,
    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """``bsa_fwd`` with the query block as two half-blocks that share each key/value tile: both score matmuls are
    issued before either softmax, so the (asynchronous, on Hopper) matmul of one half can run under the other
    half's softmax. Pointer arguments only."""
    row = tl.load(order + tl.program_id(0))
    bh = tl.program_id(1)
    b64 = (bh // H).to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    HALF: tl.constexpr = BLOCK // 2
    offs_a = row * BLOCK + tl.arange(0, HALF)
    offs_b = offs_a + HALF
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_base = Q + b64 * stride_qb + h64 * stride_qh + offs_d[None, :]
    q_a = tl.load(q_base + offs_a[:, None] * stride_qs)
    q_b = tl.load(q_base + offs_b[:, None] * stride_qs)
    k_base = K + b64 * stride_kb + h64 * stride_kh + offs_d[None, :]
    v_base = V + b64 * stride_vb + h64 * stride_vh + offs_d[None, :]

    m_a = tl.full([HALF], float("-inf"), dtype=tl.float32)
    m_b = tl.full([HALF], float("-inf"), dtype=tl.float32)
    l_a = tl.zeros([HALF], dtype=tl.float32)
    l_b = tl.zeros([HALF], dtype=tl.float32)
    acc_a = tl.zeros([HALF, HEAD_DIM], dtype=tl.float32)
    acc_b = tl.zeros([HALF, HEAD_DIM], dtype=tl.float32)
    SUB: tl.constexpr = BLOCK // BLOCK_N
    n_steps = tl.load(counts + row) * SUB
    for step in range(n_steps):
        kv_block = tl.load(indices + row * kv_width + step // SUB)
        start = kv_block * BLOCK + (step % SUB) * BLOCK_N
        k = tl.load(k_base + (start + offs_n)[:, None] * stride_ks)
        qk_a = tl.dot(q_a, k.T)
        qk_b = tl.dot(q_b, k.T)
        p_a, m_a, l_a, acc_a = _softmax_step(qk_a, m_a, l_a, acc_a, qk_scale)
        p_b, m_b, l_b, acc_b = _softmax_step(qk_b, m_b, l_b, acc_b, qk_scale)
        v = tl.load(v_base + (start + offs_n)[:, None] * stride_vs)
        acc_a = tl.dot(p_a.to(v.dtype), v, acc_a)
        acc_b = tl.dot(p_b.to(v.dtype), v, acc_b)
    o_base = O + b64 * stride_ob + h64 * stride_oh + offs_d[None, :]
    tl.store(o_base + offs_a[:, None] * stride_os, (acc_a / l_a[:, None]).to(q_a.dtype))
    tl.store(o_base + offs_b[:, None] * stride_os, (acc_b / l_b[:, None]).to(q_b.dtype))

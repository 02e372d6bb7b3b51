"""The fast attention backends (flex, triton, triton-int8) against exact block-sparse attention.

The float32 truth on the GPU is ``gathered_attention``: each query block attends, without a mask, to exactly the
keys its plan row lists (gathered), so no SDPA ever sees a mask over more than 65,536 keys (the masked EFFICIENT
SDPA kernel is wrong there). The same function in bf16 (SDPA flash) is the "bf16 dense masked SDPA" noise level
of the flash-attn rule: a bf16 backend's max error may be at most twice it.
"""

import logging
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ultragen.attention import Backend, attend, heads_last_output, pick_backend, why_not
from ultragen.attention.flex import block_mask
from ultragen.layout import make_layout
from ultragen.policy import build_plan

GPU_SIZES = ["1024x1024", "2048x2048", "4096x4096", "8192x8192", "4096x2048", "3840x2160"]  # width x height
GATHER_BYTES = 1 << 30


def gathered_attention(q, k, v, plan, dtype=torch.float32):
    """Exact block-sparse attention: (B, H, S, D) -> (B, H, S, D) in ``dtype``, query blocks grouped by key count."""
    b = plan.block_tokens
    batch, heads, seq, dim = q.shape
    q, k, v = (t.to(dtype) for t in (q, k, v))
    out = torch.empty_like(q)
    blocks_out = out.view(batch, heads, -1, b, dim)
    blocks_q = q.view(batch, heads, -1, b, dim)
    counts, indices = plan.kv_counts.to(q.device), plan.kv_indices.to(q.device).long()
    for count in counts.unique().tolist():
        rows = (counts == count).nonzero().flatten()
        per_chunk = max(1, GATHER_BYTES // (batch * heads * count * b * dim * q.element_size() * 2))
        for chunk in rows.split(per_chunk):
            g = len(chunk)
            tokens = (indices[chunk, :count, None] * b + torch.arange(b, device=q.device)).reshape(g, count * b)
            keys = k[:, :, tokens].reshape(batch, heads * g, count * b, dim)
            values = v[:, :, tokens].reshape(batch, heads * g, count * b, dim)
            queries = blocks_q[:, :, chunk].reshape(batch, heads * g, b, dim)
            blocks_out[:, :, chunk] = F.scaled_dot_product_attention(queries, keys, values).view(
                batch, heads, g, b, dim
            )
    return out


def _tiny_plan(block_tokens=8):
    layout = make_layout(16 * 12, 16 * 8, window_tokens=4, rho=2, text_tokens=8, block_tokens=block_tokens)
    return build_plan(layout, "default")


def _plan(size):
    width, height = (int(s) for s in size.split("x"))
    return build_plan(make_layout(height, width), "default")


def _qkv(plan, heads=2, dim=128, dtype=torch.bfloat16, device="cpu", seed=0, k_offset=0.0):
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (1, heads, plan.layout.seq_tokens, dim)
    q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) for _ in range(3))
    if k_offset:
        k = k + k_offset * torch.randn(dim, generator=gen, device=device)  # one large offset shared by all keys
    return q.to(dtype), k.to(dtype), v.to(dtype)


# --- CPU ---------------------------------------------------------------------------------------------------------
def test_kernel_config_rejects_split_programs_with_tma():
    from ultragen.attention.triton_bsa import KernelConfig

    with pytest.raises(ValueError, match="use_tma=False"):
        KernelConfig(q_split=True, use_tma=True)
    assert KernelConfig(q_split=True).q_split and KernelConfig(use_tma=True).use_tma


def test_gathered_attention_equals_the_reference_backend():
    plan = _tiny_plan()
    q, k, v = _qkv(plan, heads=3, dim=16, dtype=torch.float64, seed=1)
    torch.testing.assert_close(gathered_attention(q, k, v, plan, torch.float64), attend(q, k, v, plan, "reference"),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "backend, dtype, dim, block, reason",
    [
        ("triton", torch.float32, 128, 128, "dtype torch.float32 unsupported"),
        ("triton", torch.bfloat16, 96, 128, "head dim 96 unsupported"),
        ("triton", torch.bfloat16, 128, 8, "plan block of 8 tokens unsupported"),
        ("triton", torch.bfloat16, 128, 128, "needs a CUDA device"),
        ("triton-int8", torch.float16, 64, 64, "needs a CUDA device"),
        ("flex", torch.float16, 64, 8, "dtype torch.float16 unsupported on CPU"),
        ("flex", torch.float32, 24, 8, "head dim 24 unsupported"),
    ],
)
def test_why_not_gives_the_reason(backend, dtype, dim, block, reason):
    plan = _tiny_plan(block) if block == 8 else build_plan(make_layout(256, 256, text_tokens=block, block_tokens=block))
    q = torch.zeros(1, 1, plan.layout.seq_tokens, dim, dtype=dtype)
    assert reason in (why_not(Backend(backend), q, q, q, plan) or "")


def test_auto_is_the_reference_on_cpu_and_says_why(caplog):
    plan = _tiny_plan()
    q = torch.randn(1, 2, plan.layout.seq_tokens, 16)
    with caplog.at_level(logging.DEBUG, logger="ultragen.attention"):
        assert pick_backend(q, q, q, plan) is Backend.REFERENCE
    assert "triton skipped" in caplog.text and "flex skipped" in caplog.text


@pytest.mark.parametrize("backend", ["triton", "triton-int8"])
def test_explicit_triton_on_cpu_raises_with_the_reason(backend):
    plan = build_plan(make_layout(256, 256, text_tokens=64, block_tokens=64))
    q = torch.randn(1, 1, plan.layout.seq_tokens, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=f"'{backend}' cannot run here: needs a CUDA device"):
        attend(q, q, q, plan, backend)


def test_flex_block_mask_is_the_block_table():
    plan = _tiny_plan()
    mask = block_mask(plan, "cpu")
    assert mask.full_kv_indices.shape[-1] == plan.n_blocks  # as wide as the key blocks, not the row maximum
    assert int(mask.kv_num_blocks.sum()) == 0  # no partial blocks
    assert torch.equal(mask.to_dense()[0, 0].bool(), plan.block_table())
    assert block_mask(plan, "cpu") is mask  # cached


def test_flex_on_cpu_matches_the_reference_without_recompiling():
    """Compiled FlexAttention on CPU (the eager path was measured wrong, and is never used)."""
    import torch._dynamo

    plan = _tiny_plan()
    for seed in (0, 1):  # the second call, with fresh tensors of the same shape, must not recompile
        q, k, v = _qkv(plan, heads=2, dim=16, dtype=torch.float32, seed=seed)
        with torch._dynamo.config.patch(error_on_recompile=seed == 1):
            out = attend(q, k, v, plan, "flex")
        expected = attend(q.double(), k.double(), v.double(), plan, "reference")
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    rows = plan.layout.seq_tokens - plan.layout.guide_tokens  # leading blocks only (guide rows cached)
    torch.testing.assert_close(attend(q[:, :, :rows], k, v, plan, "flex").double(), expected[:, :, :rows],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "flex"])
def test_out_buffer_heads_last_and_strided_inputs_match_the_plain_call(backend):
    """What a FLUX block hands the backends: q, k, v as (B, S, H, D) transposes, the output heads-last."""
    plan = _tiny_plan()
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _qkv(plan, dim=16, dtype=torch.float32))
    out = heads_last_output(q).fill_(float("nan"))
    assert attend(q, k, v, plan, backend, out=out) is out
    assert out.transpose(1, 2).is_contiguous()  # so the block's reshape to (B, S, H*D) is a view
    expected = attend(q.double(), k.double(), v.double(), plan, "reference")
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, message", [
    (lambda q, k: torch.empty_like(q)[:, :1], "out must be like q"),
    (lambda q, k: torch.empty_like(q, dtype=torch.float64), "out must be like q"),
    (lambda q, k: torch.empty_like(q).transpose(-1, -2).contiguous().transpose(-1, -2), "last dim contiguous"),
    (lambda q, k: torch.empty_like(q[:, :1]).expand(q.shape), "overlapping"),
    (lambda q, k: k, "overlaps q, k or v"),
    (lambda q, k: k[..., :], "overlaps q, k or v"),  # a view of k
    (lambda q, k: torch.empty(q.numel(), dtype=q.dtype).as_strided(q.shape, (0, 16, 1, 1)), "overlapping"),
])
def test_a_bad_out_buffer_is_refused_with_the_fix(bad, message):
    plan = _tiny_plan()
    q, k, v = _qkv(plan, dim=16, dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        attend(q, k, v, plan, "reference", out=bad(q, k))


def test_an_out_buffer_beside_q_in_one_workspace_is_accepted():
    plan = _tiny_plan()
    q, k, v = _qkv(plan, dim=16, dtype=torch.float32)
    workspace = torch.empty(2, *q.shape)
    workspace[0] = q
    out = attend(workspace[0], k, v, plan, "reference", out=workspace[1])
    torch.testing.assert_close(out, attend(q, k, v, plan, "reference"))


def test_the_op_finds_a_live_plan_when_an_equal_one_is_freed():
    import gc

    from ultragen.attention.op import attend_op, plan_key

    plan = _tiny_plan()
    key = plan_key(plan)
    twin = _tiny_plan()
    assert plan_key(twin) == key
    del twin
    gc.collect()
    q, k, v = _qkv(plan, dim=16, dtype=torch.float32)
    torch.testing.assert_close(attend_op(q, k, v, key, "reference"), attend(q, k, v, plan, "reference"))


@pytest.mark.parametrize("heads_last_q", [True, False])
def test_the_compiled_blocks_attention_op_keeps_its_stride_contract(heads_last_q):
    """The custom op's real output must have the fake's (heads-last) strides, or inductor lays out what follows
    wrongly; opcheck compares them (and the op's schema, autograd registration and fake behaviour)."""
    from ultragen.attention.op import attend_op, plan_key

    plan = _tiny_plan()
    q, k, v = _qkv(plan, dim=16, dtype=torch.float32)
    if heads_last_q:  # as a FLUX block hands them over
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    torch.library.opcheck(attend_op, (q, k, v, plan_key(plan), "reference"))
    out = attend_op(q, k, v, plan_key(plan), "reference")
    assert out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, attend(q, k, v, plan, "reference"))


# --- flex checks itself (CPU) ------------------------------------------------------------------------------------
@pytest.fixture
def fresh_flex_verdicts(monkeypatch):
    """Forget this process's flex self-check verdicts for the test (restored after it)."""
    from ultragen.attention import flex_check

    monkeypatch.setattr(flex_check, "_VERDICTS", {})


def _patch_compiled_flex(monkeypatch, result):
    """Make the compiled FlexAttention call return ``result(real_output)``; returns the list of its calls."""
    from ultragen.attention import flex

    real, calls = flex._compiled_flex, []

    def wrong(q, k, v, **kwargs):
        calls.append(q.shape)
        return result(real()(q, k, v, **kwargs))

    monkeypatch.setattr(flex, "_compiled_flex", lambda: wrong)
    return calls


@pytest.mark.parametrize("wrong", [lambda out: torch.full_like(out, float("nan")), lambda out: out * 1.01],
                         ids=["nan", "one-percent-off"])
def test_flex_that_disagrees_with_the_reference_is_refused_with_the_reason(monkeypatch, fresh_flex_verdicts, wrong):
    plan = _tiny_plan()
    q, k, v = _qkv(plan, dim=16, dtype=torch.float32)
    calls = _patch_compiled_flex(monkeypatch, wrong)
    with pytest.raises(RuntimeError, match=r"'flex' cannot run here: compiled FlexAttention disagreed with the "
                                           r"reference on .*; use backend 'reference'"):
        attend(q, k, v, plan, "flex")
    assert len(calls) == 1  # only the self-check ran, not the real problem
    with pytest.raises(RuntimeError, match="disagreed"):
        attend(q, k, v, plan, "flex")
    assert len(calls) == 1  # the verdict is cached: no second self-check


def test_flex_that_fails_to_compile_is_refused_with_the_reason(monkeypatch, fresh_flex_verdicts):
    plan = _tiny_plan()
    q, k, v = _qkv(plan, dim=16, dtype=torch.float32)

    def broken(out):
        raise RuntimeError("C++ compile error")

    _patch_compiled_flex(monkeypatch, broken)
    with pytest.raises(RuntimeError, match=r"compiled FlexAttention failed on .*: RuntimeError: C\+\+ compile error; "
                                           r"use backend 'reference'"):
        attend(q, k, v, plan, "flex")


def test_auto_skips_a_flex_that_disagrees_and_logs_why(monkeypatch, fresh_flex_verdicts, caplog):
    import ultragen.attention as attention

    monkeypatch.setattr(attention, "_why_not_auto", lambda backend, q: None)  # as where auto would pick flex
    plan = _tiny_plan()
    q, k, v = _qkv(plan, dim=16, dtype=torch.float32)
    assert pick_backend(q, k, v, plan) is Backend.FLEX  # the real flex agrees, so auto takes it
    monkeypatch.setattr(attention.flex_check, "_VERDICTS", {})
    _patch_compiled_flex(monkeypatch, lambda out: torch.full_like(out, float("nan")))
    with caplog.at_level(logging.DEBUG, logger="ultragen.attention"):
        assert pick_backend(q, k, v, plan) is Backend.REFERENCE
    assert "flex skipped: compiled FlexAttention disagreed with the reference" in caplog.text


def test_flex_with_avx2_code_matches_the_reference():
    """In a process restricted to AVX2 (as on a CPU without AVX-512), whatever this machine has: inductor's AVX2
    Q.K^T micro-GEMM wrote past the 8-token key block at head dim 16 (NaN or wrong output) until flex padded it."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip(f"needs an x86 CPU with AVX2 (this one: {torch.backends.cpu.get_cpu_capability()})")
    script = textwrap.dedent("""
        import torch
        from ultragen.attention import attend
        from ultragen.attention.flex_check import _code_generation
        from ultragen.layout import make_layout
        from ultragen.policy import build_plan

        plan = build_plan(make_layout(16 * 12, 16 * 8, window_tokens=4, rho=2, text_tokens=8, block_tokens=8))
        gen = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(1, 2, plan.layout.seq_tokens, 16, generator=gen) for _ in range(3))
        out = attend(q, k, v, plan, "flex").double()
        expected = attend(q.double(), k.double(), v.double(), plan, "reference")
        print(_code_generation(q.device), torch.backends.cpu.get_cpu_capability(), (out - expected).abs().max().item())
    """)
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    isa, capability, err = done.stdout.split()
    assert (isa, capability) == ("avx2", "AVX2")
    assert float(err) < 1e-5


# --- Triton's int32 offsets (checked on CPU, no kernel launched) ----------------------------------------------------
@pytest.mark.parametrize(("heads", "head_dim"), [(24, 128), (1, 64), (3, 64)])
def test_triton_int32_limit_is_at_its_boundary(heads, head_dim):
    """The kernels add token x token-stride + dim in int32; with q, k, v as (B, S, H, D) views the token stride is
    H x D, so S tokens are fine while S x H x D <= 2^31 - 1 (every offset, and the count, fit an int32)."""
    from ultragen.attention.triton_bsa import why_not_triton

    largest = (2**31 - 1) // (heads * head_dim)
    q = torch.empty(1, heads, 128, head_dim, dtype=torch.bfloat16, device="meta")

    def why(seq_tokens):
        return why_not_triton(q, SimpleNamespace(layout=SimpleNamespace(seq_tokens=seq_tokens), block_tokens=128))

    assert why(largest) == "needs a CUDA device, got 'meta'"  # past the int32 check: only the device is missing
    assert why(largest + 1) == (f"{largest + 1} tokens x {heads} heads x {head_dim}: token offsets would overflow "
                                "the kernel's int32 arithmetic (an image above about 13K px a side); use backend "
                                "'flex' or a cascade")


def test_triton_accepts_8k_and_refuses_16k_for_int32():
    from ultragen.attention.triton_bsa import why_not_triton

    q = torch.empty(1, 24, 16, 128, dtype=torch.bfloat16, device="meta")  # FLUX.1: 24 heads of 128
    assert why_not_triton(q, build_plan(make_layout(8192, 8192), "default")) == "needs a CUDA device, got 'meta'"
    assert "int32 arithmetic" in why_not_triton(q, build_plan(make_layout(16384, 16384), "default"))


# --- GPU ---------------------------------------------------------------------------------------------------------
def _poisoned_call(backend, q, k, v, plan):
    """Run ``backend``; where the kernel takes an output buffer, hand it one filled with NaN."""
    from ultragen.attention.triton_bsa import triton_attention, triton_int8_attention

    if backend in ("triton", "triton-int8"):
        out = torch.full_like(q, float("nan"))
        fn = triton_attention if backend == "triton" else triton_int8_attention
        assert why_not(Backend(backend), q, k, v, plan) is None
        result = fn(q, k, v, plan, out=out)
        assert result is out
    else:
        out = attend(q, k, v, plan, backend)
    torch.cuda.synchronize()
    assert out.isfinite().all(), f"{backend}: {int((~out.isfinite()).any(-1).sum())} rows not written or not finite"
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("size", GPU_SIZES)
@pytest.mark.parametrize("backend", ["flex", "triton"])
def test_bf16_backend_within_twice_the_bf16_sdpa_error(backend, size):
    plan = _plan(size)
    q, k, v = _qkv(plan, device="cuda", seed=GPU_SIZES.index(size))
    exact = gathered_attention(q, k, v, plan, torch.float32)
    noise = (gathered_attention(q, k, v, plan, torch.bfloat16).float() - exact).abs().max().item()
    err = (_poisoned_call(backend, q, k, v, plan).float() - exact).abs().max().item()
    assert err <= 2 * noise + 1e-5, f"{backend} at {size}: max err {err:.2e} > 2 x bf16 SDPA error {noise:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("k_offset", [0.0, 30.0])
@pytest.mark.parametrize("size", GPU_SIZES)
def test_int8_cosine_per_head(size, k_offset):
    plan = _plan(size)
    q, k, v = _qkv(plan, device="cuda", seed=7, k_offset=k_offset)
    exact = gathered_attention(q, k, v, plan, torch.float32)
    out = _poisoned_call("triton-int8", q, k, v, plan).float()
    cos = F.cosine_similarity(out.flatten(2), exact.flatten(2), dim=-1).min().item()
    assert cos >= 0.999, f"triton-int8 at {size}, K offset {k_offset}: min cosine per head {cos:.5f} < 0.999"


@pytest.mark.gpu
@pytest.mark.parametrize(("size", "dtype"), [("1024x1024", torch.float16), ("4096x4096", torch.bfloat16),
                                             ("3840x2160", torch.bfloat16)])
@pytest.mark.parametrize("q_split", [False, True])
@pytest.mark.parametrize("variant", ["bf16", "int8"])
def test_whole_and_split_query_programs(variant, q_split, size, dtype):
    """Both query programs of both kernels (KernelConfig.q_split; the defaults use one of them per head dim), at
    head dim 128, to the bounds of the backend tests."""
    from ultragen.attention.triton_bsa import DEFAULT_CONFIGS, triton_attention, triton_int8_attention

    config = replace(DEFAULT_CONFIGS[(variant, 128)], q_split=q_split, use_tma=False)
    plan = _plan(size)
    q, k, v = _qkv(plan, dtype=dtype, device="cuda", seed=4, k_offset=30.0)
    exact = gathered_attention(q, k, v, plan, torch.float32)
    out = torch.full_like(q, float("nan"))
    (triton_int8_attention if variant == "int8" else triton_attention)(q, k, v, plan, config, out=out)
    assert out.isfinite().all(), f"{config}: rows not written"
    if variant == "int8":
        cos = F.cosine_similarity(out.float().flatten(2), exact.flatten(2), dim=-1).min().item()
        assert cos >= 0.999, f"{config} at {size}, {dtype}: min cosine per head {cos:.5f} < 0.999"
    else:
        noise = (gathered_attention(q, k, v, plan, dtype).float() - exact).abs().max().item()
        err = (out.float() - exact).abs().max().item()
        assert err <= 2 * noise + 1e-5, f"{config} at {size}, {dtype}: {err:.2e} vs 2 x {noise:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["flex", "triton", "triton-int8"])
def test_head_dim_64_and_fp16(backend, dtype):
    plan = _plan("2048x2048")
    q, k, v = _qkv(plan, heads=3, dim=64, dtype=dtype, device="cuda", seed=3)
    exact = gathered_attention(q, k, v, plan, torch.float32)
    out = _poisoned_call(backend, q, k, v, plan).float()
    if backend == "triton-int8":
        cos = F.cosine_similarity(out.flatten(2), exact.flatten(2), dim=-1).min().item()
        assert cos >= 0.999, f"triton-int8 {dtype} d64: min cosine per head {cos:.5f}"
    else:
        noise = (gathered_attention(q, k, v, plan, dtype).float() - exact).abs().max().item()
        err = (out - exact).abs().max().item()
        assert err <= 2 * noise + 1e-5, f"{backend} {dtype} d64: max err {err:.2e} > 2 x {noise:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flex", "triton", "triton-int8"])
def test_leading_query_blocks_only(backend):
    plan = _plan("2048x2048")
    q, k, v = _qkv(plan, device="cuda", seed=5)
    rows = plan.layout.seq_tokens - plan.layout.guide_tokens
    exact = gathered_attention(q, k, v, plan)[:, :, :rows]
    out = _poisoned_call(backend, q[:, :, :rows], k, v, plan).float()
    assert out.shape == exact.shape
    cos = F.cosine_similarity(out.flatten(2), exact.flatten(2), dim=-1).min().item()
    assert cos >= (0.999 if backend == "triton-int8" else 0.99999), f"{backend}: min cosine per head {cos:.6f}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flex", "triton", "triton-int8"])
def test_strided_inputs_and_heads_last_output(backend):
    """The compiled transformer's call: transposed q, k, v views in, a heads-last buffer out, same result."""
    plan = _plan("2048x2048")
    plain = _qkv(plan, device="cuda", seed=6)
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in plain]
    out = heads_last_output(strided[0]).fill_(float("nan"))
    assert attend(*strided, plan, backend, out=out) is out
    torch.cuda.synchronize()
    assert out.isfinite().all(), f"{backend}: rows of the heads-last output not written"
    torch.testing.assert_close(out, attend(*plain, plan, backend), rtol=0, atol=0 if backend != "flex" else 2e-3)


@pytest.mark.gpu
def test_flex_does_not_recompile_on_fresh_inputs():
    import torch._dynamo

    plan = _plan("1024x1024")
    attend(*_qkv(plan, heads=4, device="cuda", seed=0), plan, "flex")
    with torch._dynamo.config.patch(error_on_recompile=True):
        q, k, v = _qkv(plan, heads=4, device="cuda", seed=1)
        out = attend(q, k, v, plan, "flex")
    exact = gathered_attention(q, k, v, plan, torch.float32)
    assert (out.float() - exact).abs().max().item() < 2e-2


@pytest.mark.gpu
def test_auto_on_cuda_is_an_exact_fast_backend():
    plan = _plan("1024x1024")
    q = torch.randn(1, 2, plan.layout.seq_tokens, 128, device="cuda", dtype=torch.bfloat16)
    assert pick_backend(q, q, q, plan) in (Backend.TRITON, Backend.FLEX)
    assert pick_backend(q.float(), q.float(), q.float(), plan) is Backend.REFERENCE

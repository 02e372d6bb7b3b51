import pytest
import torch

from ultragen.attention import attend
from ultragen.layout import make_layout
from ultragen.policy import build_plan


def naive_masked_attention(q, k, v, mask):
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def _plan():
    layout = make_layout(16 * 12, 16 * 8, window_tokens=4, rho=2, text_tokens=8, block_tokens=8)
    return build_plan(layout, "default")


def test_reference_equals_naive_softmax_under_the_token_mask():
    plan = _plan()
    s = plan.layout.seq_tokens
    q, k, v = torch.randn(3, 2, 3, s, 16, dtype=torch.float64)
    out = attend(q, k, v, plan, "reference")
    expected = naive_masked_attention(q, k, v, plan.policy.token_mask(plan.layout))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_reference_chunks_rows_without_changing_the_result(monkeypatch):
    import ultragen.attention.reference as reference

    plan = _plan()
    s = plan.layout.seq_tokens
    q, k, v = torch.randn(3, 1, 2, s, 8, dtype=torch.float64)
    whole = attend(q, k, v, plan, "reference")
    monkeypatch.setattr(reference, "MASK_ELEMENTS", 16 * s)
    torch.testing.assert_close(attend(q, k, v, plan, "reference"), whole, rtol=0, atol=0)


def test_masked_keys_have_no_influence():
    plan = _plan()
    s = plan.layout.seq_tokens
    q, k, v = torch.randn(3, 1, 1, s, 8, dtype=torch.float64)
    mask = plan.policy.token_mask(plan.layout)
    row = 8 + 3  # a hires query
    hidden = (~mask[row]).nonzero()[0, 0]
    v2 = v.clone()
    v2[..., hidden, :] += 100.0
    assert torch.equal(attend(q, k, v, plan)[..., row, :], attend(q, k, v2, plan)[..., row, :])


@pytest.mark.parametrize("backend, error, message", [("flash-magic", ValueError, "unknown attention backend")])
def test_unknown_backend_is_refused(backend, error, message):
    plan = _plan()
    q = torch.randn(1, 1, plan.layout.seq_tokens, 8)
    with pytest.raises(error, match=message):
        attend(q, q, q, plan, backend)


def test_wrong_sequence_length_is_refused():
    plan = _plan()
    q = torch.randn(1, 1, plan.layout.seq_tokens + 8, 8)
    with pytest.raises(RuntimeError, match="does not match the plan"):
        attend(q, q, q, plan, "reference")


@pytest.mark.gpu
def test_reference_on_gpu_matches_cpu():
    plan = _plan()
    q, k, v = torch.randn(3, 1, 2, plan.layout.seq_tokens, 16)
    cpu = attend(q, k, v, plan, "reference")
    gpu = attend(q.cuda(), k.cuda(), v.cuda(), plan, "reference").cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4)


def test_leading_query_rows_only_equal_the_same_rows_of_the_full_call():
    plan = _plan()
    s = plan.layout.seq_tokens
    q, k, v = torch.randn(3, 1, 2, s, 8, dtype=torch.float64)
    rows = plan.layout.segment_offsets[2]  # text + hires, as when the guide's own rows are cached
    torch.testing.assert_close(attend(q[:, :, :rows], k, v, plan), attend(q, k, v, plan)[:, :, :rows], rtol=0, atol=0)


@pytest.mark.gpu
def test_reference_above_65536_keys_matches_gathered_exact_attention():
    """PyTorch's masked efficient SDPA is wrong beyond 65,536 keys; the reference must not be."""
    from test_attention_backends import gathered_attention

    plan = build_plan(make_layout(4096, 4096), "default")
    assert plan.layout.seq_tokens > 65536
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 1, plan.layout.seq_tokens, 64, generator=g, device="cuda") for _ in range(3))
    exact = gathered_attention(q, k, v, plan)
    torch.testing.assert_close(attend(q, k, v, plan, "reference"), exact, rtol=1e-4, atol=1e-4)

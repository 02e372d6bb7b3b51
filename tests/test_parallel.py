"""Sequence-parallel hierarchical forward (gloo, 2 and 4 CPU processes) against the one-process forward."""

from dataclasses import asdict

import pytest
import torch
from diffusers import FluxTransformer2DModel

from parallel_ranks import run_ranks
from ultragen.flux import HierFluxTransformer
from ultragen.layout import make_layout
from ultragen.parallel import HiresShards, ProcessGroupContext, SequenceParallel, step_traffic
from ultragen.policy import build_plan

TEXT, JOINT, POOLED, CHANNELS, HEADS, HEAD_DIM = 8, 32, 32, 4, 4, 16


def tiny_flux():
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=CHANNELS, num_layers=1, num_single_layers=1, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, joint_attention_dim=JOINT, pooled_projection_dim=POOLED, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ).eval()


# 12 x 12 tokens in 4 x 4 windows: 9 windows, which split 5/4 over 2 processes and 3/2/2/2 over 4
LAYOUT = make_layout(12 * 16, 12 * 16, window_tokens=4, rho=2, text_tokens=TEXT, block_tokens=8)
MODEL = tiny_flux()


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {
        "hires": torch.randn(1, LAYOUT.hires_tokens, CHANNELS, generator=g),
        "encoder_hidden_states": torch.randn(1, TEXT, JOINT, generator=g),
        "pooled_projections": torch.randn(1, POOLED, generator=g),
        "timestep": torch.full((1,), 0.7),
        "guidance": torch.full((1,), 3.5),
        "guide": torch.randn(1, LAYOUT.guide_tokens, CHANNELS, generator=g),
    }


INPUTS = inputs()
# default: guide keys/values cached, text reads text + guide; paper-v1: text reads every hires token and the guide
# reads the text (not isolated: its query rows are computed each step)
POLICIES = ("default", "paper-v1")
with torch.no_grad():
    EXPECTED = {p: HierFluxTransformer(MODEL, backend="reference")(plan=build_plan(LAYOUT, p), **INPUTS)
                for p in POLICIES}


def _parallel_forward(mode):
    def run(rank, world):
        comm = ProcessGroupContext()
        parallel = SequenceParallel(comm, mode)
        errors, sent = {}, {}
        for policy in POLICIES:
            plan = build_plan(LAYOUT, policy)
            hier = HierFluxTransformer(MODEL, backend="reference", parallel=parallel)
            before = comm.bytes_sent
            with torch.no_grad():
                out = hier(plan=plan, **INPUTS)
            sent[policy] = comm.bytes_sent - before
            errors[policy] = out
        return errors, sent
    return run


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("mode", ["ulysses", "halo"])
def test_parallel_forward_equals_one_process(world, mode):
    assert len(set(HiresShards.of(LAYOUT, world).sizes)) > 1, "the test needs windows that do not split evenly"
    for rank, (outs, sent) in enumerate(run_ranks(world, _parallel_forward(mode))):
        for policy in POLICIES:
            torch.testing.assert_close(outs[policy], EXPECTED[policy], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"rank {rank}, {mode}, {policy}: {m}")
            plan = build_plan(LAYOUT, policy)
            traffic = step_traffic(plan, world, mode, heads=HEADS, head_dim=HEAD_DIM, layers=2,
                                   out_channels=CHANNELS, elem_bytes=4, guide_queried=policy == "paper-v1")
            assert sent[policy] == traffic.per_rank_bytes[rank], (rank, mode, policy)


TINY_CONFIG = dict(patch_size=1, in_channels=CHANNELS, num_layers=1, num_single_layers=1, attention_head_dim=HEAD_DIM,
                   num_attention_heads=HEADS, joint_attention_dim=JOINT, pooled_projection_dim=POOLED,
                   guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def test_bench_rows_report_speedup_traffic_and_exactness():
    """The `bench step --parallel` code path on the CPU: one row per mode, the sharded step equal to the one-process
    step, and the bytes it sent equal to the traffic count (measure_row raises otherwise)."""
    from ultragen.parallel.bench import run_parallel_step_bench

    def run(rank, world):
        return run_parallel_step_bench(ProcessGroupContext(), [192], ["ulysses", "halo"], ["reference"], [False],
                                       precisions=["bf16"], repeats=1, log=lambda _: None, config=TINY_CONFIG,
                                       device="cpu", text_tokens=TEXT, block_tokens=8, window_tokens=4)

    rows = run_ranks(2, run)
    same = [[{k: v for k, v in asdict(r).items() if k != "peak_gb"} for r in rank_rows] for rank_rows in rows]
    assert same[0] == same[1], "every rank reports the same (slowest-rank) numbers (peak memory: NaN on the CPU)"
    assert [r.parallel for r in rows[0]] == ["ulysses", "halo"]
    for row in rows[0]:
        assert row.gpus == 2 and row.rel_err_vs_one_gpu < 1e-5
        assert row.speedup == pytest.approx(row.one_gpu_s_per_step / row.s_per_step)
        assert row.scaling_efficiency == pytest.approx(row.speedup / 2)
        assert 0 < row.comm_s_per_step and row.bytes_per_step > 0
    assert rows[0][1].bytes_per_step < rows[0][0].bytes_per_step, "halo sends less than Ulysses"


def test_ulysses_refuses_heads_that_do_not_split():
    from ultragen.parallel.ulysses import check_heads

    check_heads(24, 4)
    with pytest.raises(ValueError, match=r"24 attention heads do not split over 5 .*\[2, 3, 4, 6, 8, 12, 24\]"):
        check_heads(24, 5)


def test_too_few_windows_for_the_processes_is_refused():
    with pytest.raises(ValueError, match="9 windows .* fewer than the 10 processes"):
        HiresShards.of(LAYOUT, 10)


@pytest.mark.parametrize("policy", ["default", "authors-code", "paper-v1"])
@pytest.mark.parametrize("world", [2, 4])
def test_halo_needs_are_what_the_dense_token_mask_reads(policy, world):
    """The blocks a rank receives are exactly the other ranks' hires tokens that the token mask (derived pairwise,
    independently of the block table) lets its query tokens read."""
    from ultragen.parallel.halo import needed_blocks

    plan = build_plan(LAYOUT, policy)
    mask = plan.policy.token_mask(LAYOUT)
    shards = HiresShards.of(LAYOUT, world)
    t, h = LAYOUT.text_tokens, LAYOUT.segment_offsets[2]
    guide_queried = not plan.policy.guide_isolated
    for rank in range(world):
        lo, hi = shards.bounds(rank)
        guide_rows = list(range(h, LAYOUT.seq_tokens)) if guide_queried else []
        rows = list(range(t)) + list(range(t + lo, t + hi)) + guide_rows
        read = mask[rows].any(0)
        for src, blocks in enumerate(needed_blocks(plan, shards, rank, guide_queried)):
            a, b = shards.bounds(src)
            tokens = set((t + torch.nonzero(read[t + a : t + b]).flatten() + a).tolist()) if src != rank else set()
            got = {int(x) * 8 + i for x in blocks for i in range(8)}
            assert got == tokens, (policy, world, rank, src)

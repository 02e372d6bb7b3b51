"""Sequence-parallel hierarchical forward (gloo, 2 and 4 CPU processes) against the one-process forward."""

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

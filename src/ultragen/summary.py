"""What a run will cost, before it runs: the numbers ``ultragen plan`` prints."""

from __future__ import annotations

from ultragen.layout import HierLayout
from ultragen.policy import AttentionPlan

FLUX_HEADS, FLUX_HEAD_DIM = 24, 128  # FLUX.1-dev / schnell attention shape


def plan_summary(plan: AttentionPlan, heads: int = FLUX_HEADS, head_dim: int = FLUX_HEAD_DIM) -> dict:
    """JSON-ready description of a plan: grids, sequence, density, FLOPs and memory of one attention call."""
    layout: HierLayout = plan.layout
    dense = plan.dense_flops(heads, head_dim)
    sparse = plan.attention_flops(heads, head_dim)
    cached = plan.attention_flops(heads, head_dim, skip_guide_queries=plan.policy.guide_isolated)
    table_bytes = plan.kv_indices.numel() * 4 + plan.kv_counts.numel() * 4
    qkvo_bytes = 4 * heads * layout.seq_tokens * head_dim * 2  # q, k, v, out in bf16, batch 1
    return {
        "size_px": [layout.width_px, layout.height_px],
        "hires_grid": list(layout.hires_grid),
        "padded_hires_grid": list(layout.padded_grid),
        "padded_size_px": [layout.padded_width_px, layout.padded_height_px],
        "guide_grid": list(layout.guide_grid),
        "guide_image_grid": list(layout.guide_image_grid),
        "guide_size_px": [layout.guide_width_px, layout.guide_height_px],
        "guide_tile": list(layout.guide_tile),
        "window_tokens": layout.window_tokens,
        "rho": layout.rho,
        "policy": plan.policy.name,
        "text_len": layout.text_tokens,
        "hires_tokens": layout.hires_tokens,
        "guide_tokens": layout.guide_tokens,
        "seq_len": layout.seq_tokens,
        "block_tokens": layout.block_tokens,
        "n_blocks": plan.n_blocks,
        "allowed_blocks": plan.allowed_blocks,
        "block_density": plan.block_density,
        "max_key_blocks_per_query_block": int(plan.kv_counts.max()),
        "attention_tflops_dense": dense / 1e12,
        "attention_tflops_hier": sparse / 1e12,
        "attention_flop_reduction": dense / sparse,
        "attention_flop_reduction_guide_cached": dense / cached,
        "plan_table_bytes": table_bytes,
        "attention_qkvo_bytes": qkvo_bytes,
    }


def format_summary(s: dict) -> str:
    """Human-readable lines of :func:`plan_summary`."""
    grid = lambda g: f"{g[1]}x{g[0]} tokens"  # noqa: E731  (cols x rows, like W x H)
    mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    lines = [
        f"image            {s['size_px'][0]}x{s['size_px'][1]} px = {grid(s['hires_grid'])}",
        f"padded canvas    {s['padded_size_px'][0]}x{s['padded_size_px'][1]} px = {grid(s['padded_hires_grid'])}"
        f" (windows of {s['window_tokens']}x{s['window_tokens']} tokens; cropped back after decoding)",
        f"guide            {s['guide_size_px'][0]}x{s['guide_size_px'][1]} px = {grid(s['guide_image_grid'])}"
        f" (rho {s['rho']}; {grid(s['guide_grid'])} in tiles of {s['guide_tile'][1]}x{s['guide_tile'][0]},"
        f" edges repeated)",
        f"sequence         {s['seq_len']} tokens = text {s['text_len']} + hires {s['hires_tokens']}"
        f" + guide {s['guide_tokens']} ({s['n_blocks']} blocks of {s['block_tokens']})",
        f"policy           {s['policy']}: {s['allowed_blocks']} of {s['n_blocks'] ** 2} blocks"
        f" ({100 * s['block_density']:.3f} %), at most {s['max_key_blocks_per_query_block']} per query block",
        f"attention FLOPs  {s['attention_tflops_hier']:.2f} TFLOP per call vs {s['attention_tflops_dense']:.2f} dense"
        f" over the plain FLUX sequence: {s['attention_flop_reduction']:.1f}x fewer"
        f" ({s['attention_flop_reduction_guide_cached']:.1f}x with the guide cache)",
        f"memory           block tables {mib(s['plan_table_bytes'])};"
        f" q, k, v, out of one attention call {mib(s['attention_qkvo_bytes'])} (bf16, 24 heads x 128, batch 1)",
    ]
    return "\n".join(lines)

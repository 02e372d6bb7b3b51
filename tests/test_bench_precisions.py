"""``ultragen bench step --precisions fp8 bf16``: each row is measured with the weights it is labelled with (the
model is converted to FP8 in place, so the order given must not decide what a bf16 row runs)."""

import pytest
import torch

from flux_tiny import tiny_flux
from ultragen.bench import step

_TINY_KEYS = ("patch_size", "in_channels", "num_layers", "num_single_layers", "attention_head_dim",
              "num_attention_heads", "joint_attention_dim", "pooled_projection_dim", "guidance_embeds",
              "axes_dims_rope")


@pytest.mark.parametrize("order", [("fp8", "bf16"), ("bf16", "fp8")])
def test_rows_labelled_bf16_ran_bf16_weights(monkeypatch, order):
    """A stand-in for the FP8 conversion marks the model's linears as converted (in place, as torchao does); each
    measurement records whether the model it ran was converted, and that must equal its row's fp8 label."""
    converted = {"done": False}

    def fake_quantize(model):
        converted["done"] = True
        return sum(isinstance(m, torch.nn.Linear) for m in model.modules())

    seen = []
    measure = step._measure

    def recording(label, fn, repeats, log):
        row, out = measure(label, fn, repeats, log)
        if row is not None:
            seen.append((row.fp8, row.mode, converted["done"]))
        return row, out

    monkeypatch.setattr(step, "fp8_unavailable", lambda: None)
    monkeypatch.setattr(step, "quantize_blocks_fp8", fake_quantize)
    monkeypatch.setattr(step, "_measure", recording)
    config = {k: v for k, v in dict(tiny_flux().config).items() if k in _TINY_KEYS}
    rows = step.run_step_bench([256], ["reference"], compile_modes=(False,), precisions=order, config=config,
                               device="cpu", text_tokens=8, block_tokens=8, window_tokens=4, repeats=1,
                               log=lambda _: None)
    assert sorted((r.fp8, r.mode) for r in rows) == [(False, "dense"), (False, "hier"), (True, "dense"), (True, "hier")]
    assert all(label == ran_fp8 for label, _, ran_fp8 in seen), seen
    hier_fp8 = next(r for r in rows if r.fp8 and r.mode == "hier")
    assert hier_fp8.rel_err_vs_bf16 == 0.0  # compared with the bf16 row of the same (unchanged) stand-in weights

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ultragen.layout import InWindowOrder, Segment, make_layout
from ultragen.policy import PRESETS, AttentionPolicy, Reach, build_plan, get_policy


def block_or(mask: torch.Tensor, b: int) -> torch.Tensor:
    n = mask.shape[0] // b
    return mask.view(n, b, n, b).any(dim=3).any(dim=1)


def block_and(mask: torch.Tensor, b: int) -> torch.Tensor:
    n = mask.shape[0] // b
    return mask.view(n, b, n, b).all(dim=3).all(dim=1)


def small_layout(h_tokens, w_tokens, rho=2, order=InWindowOrder.RASTER):
    return make_layout(h_tokens * 16, w_tokens * 16, window_tokens=4, rho=rho, text_tokens=8, block_tokens=8,
                       in_window_order=order)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("size", [(8, 8), (6, 10), (16, 12)])
def test_block_table_is_block_or_of_token_mask_and_blocks_are_full(preset, size):
    layout = small_layout(*size)
    plan = build_plan(layout, preset)
    mask = plan.policy.token_mask(layout)
    b = layout.block_tokens
    assert torch.equal(plan.block_table(), block_or(mask, b))
    assert torch.equal(block_or(mask, b), block_and(mask, b)), "an allowed block is only partly allowed"


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 20),
    cols=st.integers(1, 20),
    rho=st.sampled_from([None, 2, 4]),
    order=st.sampled_from(list(InWindowOrder)),
    halo=st.integers(0, 9),
    margin=st.tuples(st.integers(0, 3), st.integers(0, 3)),
    radius=st.integers(0, 4),
    guide_reach=st.sampled_from([Reach.NONE, Reach.LOCAL, Reach.ALL]),
    text_reach=st.sampled_from([Reach.NONE, Reach.ALL]),
)
def test_block_table_matches_token_mask_for_random_policies(rows, cols, rho, order, halo, margin, radius,
                                                            guide_reach, text_reach):
    layout = small_layout(rows, cols, rho=rho, order=order)
    policy = AttentionPolicy(hires_halo_tokens=halo, guide_margin_tokens=margin, guide_radius_tokens=radius,
                             hires_to_guide=guide_reach, guide_to_guide=Reach.LOCAL, text_to_hires=text_reach)
    plan = build_plan(layout, policy)
    mask = policy.token_mask(layout)
    assert torch.equal(plan.block_table(), block_or(mask, 8))
    assert torch.equal(block_or(mask, 8), block_and(mask, 8))


def test_default_policy_at_4k_has_the_designed_structure():
    layout = make_layout(4096, 4096)
    plan = build_plan(layout, "default")
    table = plan.block_table()
    text, hires, guide = (plan.query_blocks_of(s) for s in Segment)
    # text -> text + all guide, not hires
    assert table[text.start, text.start:text.stop].all() and table[text.start, guide.start:].all()
    assert not table[text.start, hires.start:hires.stop].any()
    # guide -> guide only (isolated, so its keys/values can be cached)
    assert table[guide.start, guide.start:].all() and not table[guide.start, :guide.start].any()
    assert plan.policy.guide_isolated
    # an interior hires block: 4 text + own window, left/right windows, nearer halves above (9) + 2-4 guide tiles
    q = hires.start + 2 * (16 * 5 + 5)  # top half of window (5, 5)
    keys = plan.kv_indices[q, : plan.kv_counts[q]].tolist()
    assert keys[:4] == list(text)
    hires_keys = [k for k in keys if k in hires]
    assert len(hires_keys) == 9
    window_of = lambda blk: ((blk - hires.start) // 2 // 16, (blk - hires.start) // 2 % 16)
    assert {window_of(k) for k in hires_keys} == {(4, 4), (4, 5), (4, 6), (5, 4), (5, 5), (5, 6)}
    assert 1 <= sum(k in guide for k in keys) <= 4


def test_halo_zero_means_own_window_only():
    layout = make_layout(2048, 2048)
    plan = build_plan(layout, get_policy("default", hires_halo_tokens=0, hires_to_guide="none", hires_to_text="none"))
    hires = plan.query_blocks_of(Segment.HIRES)
    assert torch.all(plan.kv_counts[hires.start:hires.stop] == 2)


def test_8k_default_plan_cuts_attention_flops_over_50x():
    plan = build_plan(make_layout(8192, 8192))
    assert plan.dense_flops(24, 128) / plan.attention_flops(24, 128) >= 50


def test_presets_differ_as_documented():
    authors, paper = PRESETS["authors-code"], PRESETS["paper-v1"]
    assert authors.text_to_hires is Reach.ALL and authors.text_to_guide is Reach.NONE
    assert authors.guide_to_guide is Reach.LOCAL and authors.guide_isolated
    assert paper.guide_to_text is Reach.ALL and not paper.guide_isolated
    assert AttentionPolicy.from_dict(PRESETS["default"].to_dict()) == PRESETS["default"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: get_policy("windows-only"), "unknown attention policy"),
        (lambda: AttentionPolicy(text_to_hires="local"), "not supported"),
        (lambda: AttentionPolicy(hires_to_hires="sideways"), "not a reach"),
        (lambda: AttentionPolicy(hires_halo_tokens=-1), ">= 0"),
        (lambda: AttentionPolicy.from_dict({"halo": 3}), "unknown attention policy keys"),
        (lambda: build_plan(make_layout(32768, 32768), "dense"), "GiB of block tables"),
    ],
)
def test_bad_policies_raise_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_policy_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["default"].hires_halo_tokens = 3


def test_policy_file_with_a_base_preset_changes_only_its_fields(tmp_path):
    path = tmp_path / "halo0.json"
    path.write_text('{"base": "authors-code", "hires_halo_tokens": 0}')
    policy = get_policy(str(path))
    assert policy == dataclasses.replace(PRESETS["authors-code"], name="halo0", hires_halo_tokens=0)
    layout = make_layout(1024, 1024, rho=4)
    assert build_plan(layout, str(path)).kv_counts.sum() < build_plan(layout, "authors-code").kv_counts.sum()


def test_policy_file_with_every_field_round_trips(tmp_path):
    import json

    path = tmp_path / "p.json"
    path.write_text(json.dumps(PRESETS["paper-v1"].to_dict()))
    assert get_policy(str(path)) == PRESETS["paper-v1"]  # its own name wins over the file's


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("{not json", "not readable JSON"),
    ("[1, 2]", "JSON object"),
    ('{"base": "wide"}', "base='wide' is not a preset"),
    ('{"base": "default", "hires_halo": 3}', "unknown attention policy keys"),
    ('{"base": "default", "hires_to_hires": "sometimes"}', "is not a reach"),
    ('{"base": ["default"]}', "is not a preset"),
    ('{"base": "default", "guide_radius_tokens": "2"}', "guide_radius_tokens='2' must be a whole number"),
    ('{"base": "default", "hires_halo_tokens": 2.5}', "hires_halo_tokens=2.5 must be a whole number"),
    ('{"base": "default", "hires_halo_tokens": true}', "hires_halo_tokens=True must be a whole number"),
    ('{"base": "default", "guide_margin_tokens": [1.7, 2]}', "must be two whole numbers"),
    ("DIR", "is not a file"),
])
def test_bad_policy_files_teach(tmp_path, content, message):
    path = tmp_path / "bad.json"
    if content == "DIR":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        get_policy(str(path))

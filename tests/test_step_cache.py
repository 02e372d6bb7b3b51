"""Step caching (First-Block-Cache) in both hierarchical transformers, its settings and its place in the pipeline.

References are independent of ``ultragen.step_cache``: the uncached forward, and for a skipped step the first
block's output (a copy of the model cut to its first block) plus the residual the remaining blocks added in the last
computed step, through the stock model's ``norm_out`` / ``proj_out``."""

import copy
from collections import Counter

import pytest
import torch
from torch import nn

import flux2_tiny
import flux_tiny
from ultragen.flux import HierFluxTransformer
from ultragen.flux import transformer as flux_transformer
from ultragen.flux2 import HierFlux2Transformer
from ultragen.flux2 import transformer as flux2_transformer
from ultragen.policy import build_plan
from ultragen.step_cache import CacheKind, StepCacheConfig, parse_cache

STEPS = 4
SIGMAS = [0.9, 0.7, 0.5, 0.3, 0.1]


class Family:
    """What differs between FLUX.1 and FLUX.2 in these tests."""

    def __init__(self, name):
        self.name = name
        self.tiny = flux_tiny if name == "flux1" else flux2_tiny
        self.hier_class = HierFluxTransformer if name == "flux1" else HierFlux2Transformer
        self.module = flux_transformer if name == "flux1" else flux2_transformer

    def model(self):
        if self.name == "flux1":
            return flux_tiny.tiny_flux(layers=2, single_layers=2)
        return flux2_tiny.tiny_flux2(layers=2, single_layers=2)

    def call(self, hier, plan, inputs, x, sigma, text=None):
        """Velocity (B, hires_tokens, C) of window-first tokens ``x`` at ``sigma``."""
        layout = plan.layout
        t = torch.full((x.shape[0],), sigma)
        text = inputs["encoder_hidden_states"] if text is None else text
        guide = layout.guide_to_sequence(inputs["guide"])
        if self.name == "flux1":
            return hier(x, text, inputs["pooled_projections"], t, plan, guide=guide, guidance=inputs["guidance"])
        return hier(x, text, t, plan, guide=guide)

    def final(self, model, hires, inputs, sigma):
        """The stock model's output layers on hires (B, tokens, D): norm_out (modulated by the step's time
        embedding) and proj_out."""
        t = torch.full((hires.shape[0],), sigma) * 1000
        if self.name == "flux1":
            temb = model.time_text_embed(t, inputs["guidance"] * 1000, inputs["pooled_projections"])
        else:
            temb = model.time_guidance_embed(t, None)
        return model.proj_out(model.norm_out(hires, temb))


FAMILIES = [Family("flux1"), Family("flux2")]


def run_steps(family, hier, plan, inputs, steps=STEPS):
    """A few Euler steps from the inputs' hires tokens; returns every step's velocity."""
    layout = plan.layout
    x = layout.hires_to_sequence(inputs["hires"])
    outs = []
    with torch.no_grad():
        for i in range(steps):
            v = family.call(hier, plan, inputs, x, SIGMAS[i])
            outs.append(v)
            x = x + (SIGMAS[i + 1] - SIGMAS[i]) * v
    return outs


def setup(family, seed=1):
    layout = family.tiny.tiny_layout(8, 16)
    plan = build_plan(layout, "default")
    assert plan.policy.guide_isolated  # the guide keys/values cache is on
    return layout, plan, family.tiny.tiny_inputs(layout, seed=seed)


def count_block_calls(monkeypatch, family) -> Counter:
    """Per block module, how often the hierarchical forward ran it (through the transformer module's block
    functions)."""
    calls: Counter = Counter()
    for name in ("double_block", "single_block"):
        fn = getattr(family.module, name)

        def counting(block, *args, _fn=fn, **kwargs):
            calls[id(block)] += 1
            return _fn(block, *args, **kwargs)

        monkeypatch.setattr(family.module, name, counting)
    return calls


def first_block_only(model: nn.Module) -> nn.Module:
    cut = copy.deepcopy(model)
    cut.transformer_blocks = nn.ModuleList(cut.transformer_blocks[:1])
    cut.single_transformer_blocks = nn.ModuleList()
    return cut


def norm_out_inputs(model: nn.Module) -> list:
    """Record every input the stock norm_out gets (the hires stream after the last block run)."""
    seen = []
    model.norm_out.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    return seen


# --- the forward ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_threshold_zero_never_skips_and_is_bitwise_the_uncached_run(family):
    model = family.model()
    _, plan, inputs = setup(family)
    plain = run_steps(family, family.hier_class(model, backend="reference"), plan, inputs)
    hier = family.hier_class(model, backend="reference")
    cache = hier.set_step_cache("fbcache:0")
    cached = run_steps(family, hier, plan, inputs)
    for a, b in zip(plain, cached):
        assert torch.equal(a, b)
    assert (cache.computed, cache.skipped) == (STEPS, 0)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_huge_threshold_reuses_the_residual_after_the_first_step(family, monkeypatch):
    model = family.model()
    layout, plan, inputs = setup(family)
    # the reference: the first block alone (a cut copy of the model) and the full model, both uncached; their
    # norm_out inputs are the hires stream after block 0 and after every block
    cut, full = first_block_only(model), copy.deepcopy(model)
    after_first, after_all = norm_out_inputs(cut), norm_out_inputs(full)
    hier_cut, hier_full = family.hier_class(cut, backend="reference"), family.hier_class(full, backend="reference")

    calls = count_block_calls(monkeypatch, family)
    hier = family.hier_class(model, backend="reference")
    guide_passes = []
    guide_pass = hier._guide_pass
    hier._guide_pass = lambda *a, **k: guide_passes.append(1) or guide_pass(*a, **k)
    cache = hier.set_step_cache("fbcache:1e6")
    x = layout.hires_to_sequence(inputs["hires"])
    with torch.no_grad():
        for i in range(STEPS):
            calls_before = Counter(calls)
            v = family.call(hier, plan, inputs, x, SIGMAS[i])
            ran = calls - calls_before
            family.call(hier_cut, plan, inputs, x, SIGMAS[i])
            if i == 0:
                family.call(hier_full, plan, inputs, x, SIGMAS[i])
                torch.testing.assert_close(v, family.final(model, after_all[0], inputs, SIGMAS[i]))
                tail = after_all[0] - after_first[0]  # what the remaining blocks added in the computed step
            else:
                expected = family.final(model, after_first[i] + tail, inputs, SIGMAS[i])
                torch.testing.assert_close(v, expected, rtol=1e-5, atol=1e-6)
                assert ran == Counter({id(model.transformer_blocks[0]): 1}), "a skipped step ran other blocks"
            x = x + (SIGMAS[i + 1] - SIGMAS[i]) * v
    assert (cache.computed, cache.skipped) == (1, STEPS - 1)
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    # each block: once in the guide's keys/values pass, then the first every step and the rest in step 0 only
    assert [calls[id(b)] for b in blocks] == [1 + STEPS, 2, 2, 2]
    assert len(guide_passes) == 1  # the guide's keys/values: once for the image, skipped steps or not


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_a_fresh_step_cache_per_image_is_not_contaminated_by_the_last(family):
    model = family.model()
    _, plan, inputs = setup(family, seed=1)
    _, _, other = setup(family, seed=2)
    other = {**inputs, "hires": other["hires"], "guide": other["guide"]}  # another seed, the same prompt
    hier = family.hier_class(model, backend="reference")
    hier.set_step_cache("fbcache:1e6")
    run_steps(family, hier, plan, inputs)
    hier.set_step_cache("fbcache:1e6")  # what the pipeline does before each image
    second = run_steps(family, hier, plan, other)
    fresh = family.hier_class(model, backend="reference")
    fresh.set_step_cache("fbcache:1e6")
    for a, b in zip(second, run_steps(family, fresh, plan, other)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_a_new_plan_resets_the_cache_by_itself(family):
    model = family.model()
    _, plan, inputs = setup(family)
    hier = family.hier_class(model, backend="reference")
    cache = hier.set_step_cache("fbcache:1e6")
    run_steps(family, hier, plan, inputs, steps=2)
    new_plan = build_plan(plan.layout, "default")  # same geometry, another plan object: a new pass
    full = family.hier_class(model, backend="reference")
    x = plan.layout.hires_to_sequence(inputs["hires"])
    with torch.no_grad():
        v = family.call(hier, new_plan, inputs, x, SIGMAS[0])
        torch.testing.assert_close(v, family.call(full, new_plan, inputs, x, SIGMAS[0]))
    assert (cache.computed, cache.skipped) == (1, 0)


def test_cfg_branches_keep_separate_states():
    """Two prompts per step (CFG): each branch computes its first step and reuses its own residual after."""
    family = FAMILIES[1]
    model = family.model()
    layout, plan, inputs = setup(family)
    negative = torch.randn_like(inputs["encoder_hidden_states"])
    hier = family.hier_class(model, backend="reference")
    cache = hier.set_step_cache("fbcache:1e6")
    plain = family.hier_class(model, backend="reference")
    x = layout.hires_to_sequence(inputs["hires"])
    with torch.no_grad():
        for text in (None, negative):  # step 0: both branches computed, exactly the uncached velocity
            v = family.call(hier, plan, inputs, x, SIGMAS[0], text=text)
            assert torch.equal(v, family.call(plain, plan, inputs, x, SIGMAS[0], text=text))
        # one shared state would have skipped the negative branch at step 0 with the positive's residual
        assert (cache.computed, cache.skipped) == (2, 0)
        skipped_neg = family.call(hier, plan, inputs, x, SIGMAS[1], text=negative)
        family.call(hier, plan, inputs, x, SIGMAS[1])
    assert (cache.computed, cache.skipped) == (2, 2)
    # the negative branch's skipped step used its own residual: the same as a run of that branch alone
    fresh = family.hier_class(model, backend="reference")
    fresh_cache = fresh.set_step_cache("fbcache:1e6")
    with torch.no_grad():
        family.call(fresh, plan, inputs, x, SIGMAS[0], text=negative)
        alone = family.call(fresh, plan, inputs, x, SIGMAS[1], text=negative)
    assert fresh_cache.skipped == 1
    torch.testing.assert_close(skipped_neg, alone, rtol=0, atol=0)


def test_gradients_bypass_the_step_cache(monkeypatch):
    family = FAMILIES[0]
    model = family.model()
    _, plan, inputs = setup(family)
    calls = count_block_calls(monkeypatch, family)
    hier = family.hier_class(model, backend="reference")
    cache = hier.set_step_cache("fbcache:1e6")
    x = plan.layout.hires_to_sequence(inputs["hires"])
    for _ in range(2):  # gradients on (training): never skipped
        family.call(hier, plan, inputs, x, 0.5)
    assert (cache.computed, cache.skipped) == (0, 0) and sum(calls.values()) == 2 * 4


def test_a_step_cache_with_parallel_is_refused():
    hier = HierFluxTransformer(flux_tiny.tiny_flux(), backend="reference", parallel=object())
    with pytest.raises(ValueError, match="not supported.*leave out --cache or --parallel"):
        hier.set_step_cache("fbcache")
    hier.set_step_cache("off")


def test_diffusers_block_hooks_never_fire_in_our_forward():
    """Why ``ultragen.step_cache`` exists: diffusers' FirstBlockCache hooks wrap the blocks' forward, which our
    forward does not call, so they would never skip anything (a huge threshold leaves the output unchanged)."""
    from diffusers.hooks import FirstBlockCacheConfig

    family = FAMILIES[0]
    model = family.model()
    _, plan, inputs = setup(family)
    plain = run_steps(family, family.hier_class(copy.deepcopy(model), backend="reference"), plan, inputs, steps=3)
    model.enable_cache(FirstBlockCacheConfig(threshold=1e6))
    forwards = []
    for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
        block.register_forward_pre_hook(lambda *a: forwards.append(1))
    with model.cache_context("cond"):
        hooked = run_steps(family, family.hier_class(model, backend="reference"), plan, inputs, steps=3)
    assert forwards == []
    for a, b in zip(plain, hooked):
        assert torch.equal(a, b)


# --- settings -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "kind", "threshold"), [
    ("off", CacheKind.OFF, 0.0), ("fbcache", CacheKind.FBCACHE, 0.08), ("fbcache:0.1", CacheKind.FBCACHE, 0.1),
    (" FBCache:0 ", CacheKind.FBCACHE, 0.0)])
def test_parse_cache(text, kind, threshold):
    config = parse_cache(text)
    assert (config.kind, config.threshold) == (kind, threshold)
    assert parse_cache(str(config)) == config


@pytest.mark.parametrize(("text", "message"), [
    ("teacache", "unknown step cache 'teacache'; use one of: off, fbcache"),
    ("fbcache:abc", "'abc' in 'fbcache:abc' is not a number"),
    ("fbcache:-0.1", r"must be a number in \[0, 1e\+06\]"),
    ("fbcache:nan", r"must be a number in \[0"),
    ("off:0.1", "'off' takes no threshold"),
    ("", "unknown step cache ''")])
def test_bad_cache_settings_are_one_line_errors(text, message):
    with pytest.raises(ValueError, match=message) as err:
        parse_cache(text)
    assert "\n" not in str(err.value)


def test_config_validates_in_one_place():
    with pytest.raises(ValueError, match="unknown step cache"):
        StepCacheConfig("magcache")
    with pytest.raises(ValueError, match="must be a number"):
        StepCacheConfig(CacheKind.FBCACHE, True)
    assert StepCacheConfig("fbcache", 1).threshold == 1.0


# --- command line and pipeline --------------------------------------------------------------------------------------
def _dry_run(capsys, *cache):
    import json

    from ultragen.cli import main

    code = main(["generate", "--prompt", "a cat", "--model", "tiny-random", "--height", "256", "--width", "256",
                 "--dry-run", *cache])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


@pytest.mark.parametrize(("given", "expected"), [((), "off"), (("--cache", "off"), "off"),
                                                 (("--cache", "fbcache"), "fbcache:0.08"),
                                                 (("--cache", "fbcache:0.1"), "fbcache:0.1")])
def test_generate_cache_option(capsys, given, expected):
    code, plan, _ = _dry_run(capsys, *given)
    assert code == 0
    assert plan["config"]["step_cache"] == expected


@pytest.mark.parametrize("bad", ["teacache", "fbcache:x", "fbcache:-1", "off:0.2"])
def test_generate_bad_cache_exits_2_with_one_line(capsys, bad):
    code, _, err = _dry_run(capsys, "--cache", bad)
    assert code == 2
    assert err.count("\n") == 1 and "--cache" in err


def test_pipeline_records_skips_and_resets_between_images():
    """tiny-random end to end: threshold 0 is the uncached image; a huge threshold skips every hires step after
    the first (recorded), and a second image is the one a fresh pipeline makes for its seed."""
    from ultragen.pipeline.two_stage import UltraGenPipeline

    settings = dict(num_inference_steps=5, warm_start_skip=1, guide_steps=2, output_type="latent", progress=False)

    def image(pipe, seed, cache):
        return pipe("a red fox", 256, 256, generator=torch.Generator().manual_seed(seed), step_cache=cache,
                    **settings).latents

    pipe = UltraGenPipeline.from_pretrained("tiny-random", dtype=torch.float32)
    plain = image(pipe, 3, "off")
    assert pipe.last_step_cache == [{"cache": "off", "steps_computed": 0, "steps_skipped": 0}]
    assert torch.equal(image(pipe, 3, "fbcache:0"), plain)
    assert pipe.last_step_cache == [{"cache": "fbcache:0", "steps_computed": 4, "steps_skipped": 0}]
    cached = image(pipe, 3, "fbcache:1e6")
    assert pipe.last_step_cache == [{"cache": "fbcache:1e+06", "steps_computed": 1, "steps_skipped": 3}]
    assert not torch.allclose(cached, plain)
    second = image(pipe, 4, "fbcache:1e6")
    fresh = UltraGenPipeline.from_pretrained("tiny-random", dtype=torch.float32)
    assert torch.equal(second, image(fresh, 4, "fbcache:1e6"))

"""ultragen.eval's metric formulas against independent computations: FID against numpy/scipy's Frechet distance on
the same features, IS against its formula on fixed logits, CLIP score and CLIP-IQA against a tiny random CLIP's own
full forward pass (logits_per_image) on the same inputs."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from ultragen.eval.clip import ClipEmbedder
from ultragen.eval.clip_metrics import clip_iqa_scores, clip_scores
from ultragen.eval.fidelity import check_fid_samples, check_is_samples, frechet_distance, inception_score
from ultragen.eval.tiny import write_tiny_clip


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The Frechet distance as in Heusel et al.'s reference code: ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b))."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


def test_fid_matches_scipy_frechet_distance():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(16, 16))
    a = rng.normal(size=(300, 16)) @ mix
    b = rng.normal(loc=0.3, size=(200, 16)) @ (mix + 0.2 * rng.normal(size=(16, 16)))
    expected = scipy_fid(a, b)
    got = frechet_distance(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    assert expected > 1.0
    assert got == pytest.approx(expected, rel=1e-4)
    assert frechet_distance(torch.from_numpy(a).float(), torch.from_numpy(a).float()) == pytest.approx(0, abs=1e-3)


def is_formula(logits: np.ndarray) -> float:
    """exp(E_x KL(p(y|x) || p(y))) on one set."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    marginal = p.mean(0)
    return float(np.exp((p * (np.log(p) - np.log(marginal))).sum(1).mean()))


def test_inception_score_matches_formula():
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3.0, size=(40, 12))
    mean, std = inception_score(torch.from_numpy(logits), splits=1, seed=0)
    assert mean == pytest.approx(is_formula(logits), rel=1e-6)
    assert std == 0.0
    # several splits: the mean over the splits of a seeded shuffle (torchmetrics shuffles with torch's global RNG)
    torch.manual_seed(5)
    order = torch.randperm(40).numpy()
    per_split = [is_formula(logits[order][i * 10:(i + 1) * 10]) for i in range(4)]
    mean4, std4 = inception_score(torch.from_numpy(logits), splits=4, seed=5)
    assert mean4 == pytest.approx(np.mean(per_split), rel=1e-6)
    assert std4 == pytest.approx(np.std(per_split, ddof=1), rel=1e-6)
    assert inception_score(torch.from_numpy(logits), splits=4, seed=5) == (mean4, std4)


def test_sample_count_rules_name_the_numbers():
    with pytest.raises(ValueError, match=r"1000 generated images give a covariance of rank at most 999 < 2048.*"
                                         r"at least 2049.*--fid-features 768"):
        check_fid_samples(1000, 10_000, 2048, "images")
    with pytest.raises(ValueError, match=r"fid_patch: 30 reference patches.*--patches-per-image"):
        check_fid_samples(3000, 30, 2048, "patches")
    check_fid_samples(2049, 2049, 2048, "images")
    with pytest.raises(ValueError, match=r"is: 7 images cannot fill 10 splits.*--is-splits 7"):
        check_is_samples(7, 10, "images")
    check_is_samples(10, 10, "images")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


def full_forward_cosines(folder, images: torch.Tensor, texts: list[str]) -> np.ndarray:
    """cos(image i, text j) from CLIPModel's own forward: logits_per_image / exp(logit_scale)."""
    from transformers import AutoTokenizer, CLIPModel
    from transformers.models.clip import CLIPImageProcessorPil

    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    tokens = AutoTokenizer.from_pretrained(folder, local_files_only=True)(texts, padding=True, return_tensors="pt")
    pixels = CLIPImageProcessorPil.from_pretrained(folder)(
        images=[Image_from(im) for im in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
    return (out.logits_per_image / model.logit_scale.exp()).detach().double().numpy()


def Image_from(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray(image.permute(1, 2, 0).numpy())


def test_clip_score_and_clip_iqa_match_the_models_forward(tiny_clip, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 48, 40), dtype=torch.uint8, generator=generator)
    prompts = ["a red fox", "a city at night", "two cats", "a mountain lake", "a bowl of fruit", "a ship"]
    embedder = ClipEmbedder(tiny_clip, torch.device("cpu"))
    image_embeds = embedder.images(images)

    cos = full_forward_cosines(tiny_clip, images, prompts)
    expected = np.maximum(100 * np.diag(cos), 0)
    got = clip_scores(image_embeds, embedder.texts(prompts)).double().numpy()
    assert np.diag(cos).std() > 1e-2  # the images and prompts are told apart
    np.testing.assert_allclose(got, expected, atol=1e-3)

    # A random CLIP's "Good photo."/"Bad photo." cosines differ so much that 100x saturates the softmax at 0 or 1;
    # a near-identical pair keeps it in its sensitive range (the pair itself is checked end to end).
    pair = ["Good photo.", "Good photo!"]
    logits = 100 * full_forward_cosines(tiny_clip, images, pair)
    expected_iqa = np.exp(logits[:, 0]) / np.exp(logits).sum(1)
    got_iqa = clip_iqa_scores(image_embeds, embedder.texts(pair)).double().numpy()
    assert 0.05 < expected_iqa.min() and expected_iqa.max() < 0.95 and expected_iqa.std() > 1e-3
    np.testing.assert_allclose(got_iqa, expected_iqa, atol=1e-4)


def test_clip_score_is_zero_for_opposed_embeddings():
    image = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    text = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    assert clip_scores(image, text).tolist() == pytest.approx([0.0, 60.0])

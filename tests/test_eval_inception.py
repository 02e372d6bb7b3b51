"""The production InceptionV3 adapter's contract with torch-fidelity (whose import needs a torchvision that does not
load beside this CPU torch build, so a stand-in module plays torch-fidelity here): the local weights path and the
requested layers are passed, both outputs come back, and a failing import is one teaching line, not a traceback."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from ultragen.eval.inception import InceptionFeatures


def test_adapter_passes_weights_and_layers(monkeypatch, tmp_path):
    made = {}

    class FakeInception(torch.nn.Module):
        def __init__(self, name, features_list, feature_extractor_weights_path=None):
            super().__init__()
            made.update(name=name, features=features_list, weights=feature_extractor_weights_path)

        def forward(self, x):
            assert x.dtype == torch.uint8
            n = x.shape[0]
            return torch.ones(n, 768, dtype=torch.float64), torch.zeros(n, 1008)

    module = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    module.FeatureExtractorInceptionV3 = FakeInception
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", module)
    weights = tmp_path / "w.pth"
    net = InceptionFeatures(weights, 768, torch.device("cpu"))
    assert made == {"name": "inception-v3-compat", "features": ["768", "logits_unbiased"], "weights": str(weights)}
    features, logits = net(torch.zeros(3, 3, 40, 50, dtype=torch.uint8))
    assert features.shape == (3, 768) and features.dtype == torch.float32 and logits.shape == (3, 1008)
    assert net.feature_dim == 768


def test_import_failure_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import raises ImportError
    with pytest.raises(ValueError, match=r"^FID/IS use torch-fidelity's InceptionV3, which did not import "
                                         r"\((ModuleNotFound|Import)Error.*pip install torch-fidelity") as info:
        InceptionFeatures(tmp_path / "w.pth", 2048, torch.device("cpu"))
    assert "\n" not in str(info.value)

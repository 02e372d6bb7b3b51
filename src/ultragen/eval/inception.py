"""The network behind FID and IS: anything that maps uint8 images to (pooled features, class logits).

Production: torch-fidelity's InceptionV3 (the TensorFlow FID network ported to PyTorch, the one torchmetrics' FID
uses), loaded from a local weights file. Tests plug in a small random conv net with the same interface."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch


class FeatureNet(Protocol):
    """uint8 images [N, 3, H, W] (any H, W; the net resizes) -> (features [N, feature_dim], logits [N, classes])."""

    feature_dim: int

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class InceptionFeatures:
    """torch-fidelity's FeatureExtractorInceptionV3: pooled features of width ``feature_dim`` (64/192/768/2048) and
    the 1008 unbiased logits that IS uses, from one forward pass. Input: uint8 [N, 3, H, W], resized inside to
    299x299 with TensorFlow 1.x's bilinear rule, as in the original FID code."""

    def __init__(self, weights: Path, feature_dim: int, device: torch.device) -> None:
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except Exception as error:  # ImportError, or torchvision's operator registration failing at import
            raise ValueError(
                f"FID/IS use torch-fidelity's InceptionV3, which did not import ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}); pip install torch-fidelity and a torchvision "
                f"built for torch {torch.__version__}, or leave fid,is,fid_patch,is_patch out of --metrics") from None
        self.feature_dim = feature_dim
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", [str(feature_dim), "logits_unbiased"],
            feature_extractor_weights_path=str(Path(weights).expanduser())).eval().to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, logits = self.net(images.to(self.device))
        return features.float().cpu(), logits.float().cpu()


def load_inception(weights: Path, feature_dim: int, device: torch.device) -> FeatureNet:
    """The production feature network (the one place tests replace)."""
    return InceptionFeatures(weights, feature_dim, device)

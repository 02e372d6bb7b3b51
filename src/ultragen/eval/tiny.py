"""Small random stand-ins for the evaluation networks, built in code (nothing from the hub): a conv net with the
``FeatureNet`` interface in place of InceptionV3, and a CLIP model written as a local Hugging Face folder. For tests
and offline smoke runs of ``ultragen eval``; their figures mean nothing."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_INPUT_PX = 32  # the stand-in resizes every image to this, as InceptionV3 resizes to 299


class TinyFeatureNet(torch.nn.Module):
    """uint8 [N, 3, H, W] -> (features [N, feature_dim], logits [N, classes]); random weights from ``seed``."""

    def __init__(self, feature_dim: int = 8, classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 4, stride=4), torch.nn.GELU(), torch.nn.Conv2d(16, feature_dim, 3, padding=1))
        self.head = torch.nn.Linear(feature_dim, classes)
        torch.random.set_rng_state(generator_state)
        self.feature_dim = feature_dim
        self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.float() / 127.5 - 1.0
        x = torch.nn.functional.interpolate(x, size=(TINY_INPUT_PX, TINY_INPUT_PX), mode="bilinear",
                                            align_corners=False, antialias=True)
        features = self.body(x).mean(dim=(2, 3))
        return features, 4.0 * self.head(features)


def write_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A random CLIP (ViT, 32 px input, 16-d projection) with the byte-level tokenizer of ``tiny-random`` and a
    CLIP image processor, saved with save_pretrained so it loads like a downloaded model. Returns ``folder``."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip import CLIPImageProcessorPil

    from ultragen.pipeline.tiny import tiny_tokenizers

    tokenizer, _ = tiny_tokenizers()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    torch.random.set_rng_state(state)
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder

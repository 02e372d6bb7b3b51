"""CLIP embeddings for CLIP score and CLIP-IQA, from a local Hugging Face CLIP folder (``local_files_only``: no
download is ever attempted). Images go through the folder's own image processor (resize the short side, centre crop,
normalise) with PIL, so torchvision is not needed."""

from __future__ import annotations

from pathlib import Path

import torch


class ClipEmbedder:
    """``images(uint8 [N, 3, H, W]) -> [N, P]`` and ``texts(list[str]) -> [N, P]``: projected embeddings,
    L2-normalised, float32 on the CPU."""

    def __init__(self, folder: Path, device: torch.device) -> None:
        from transformers import AutoTokenizer, CLIPModel
        from transformers.models.clip import CLIPImageProcessorPil
        from transformers.utils import logging as hf_logging

        folder = Path(folder).expanduser()
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a "Loading weights" bar per run is noise in an eval log
        try:
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True).eval().to(device)
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            self.processor = CLIPImageProcessorPil.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as error:
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"--clip-model {str(folder)!r} could not be loaded as a CLIP model with its tokenizer "
                             f"and image processor ({first}); download the whole folder, e.g. "
                             f"`hf download openai/clip-vit-large-patch14 --local-dir DIR`") from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        self.device = device
        self.max_tokens = self.model.config.text_config.max_position_embeddings
        self.name = self.model.config.name_or_path or str(folder)

    @torch.no_grad()
    def images(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.processor(images=[im.permute(1, 2, 0).numpy() for im in images],
                                return_tensors="pt")["pixel_values"]
        return _normalised(self.model.get_image_features(pixel_values=pixels.to(self.device)))

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens,
                                return_tensors="pt").to(self.device)
        return _normalised(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                        attention_mask=tokens["attention_mask"]))


def _normalised(output) -> torch.Tensor:
    """transformers 5 returns a ModelOutput whose pooler_output is the projected embedding; 4.x a tensor."""
    embeds = output if isinstance(output, torch.Tensor) else output.pooler_output
    embeds = embeds.float().cpu()
    return embeds / embeds.norm(dim=-1, keepdim=True)

"""Where the feature networks' weights come from: local paths only. A missing one fails before any image is read,
with one line naming the file or Hugging Face id to download, where to put it and the option to pass. Nothing here (or
anywhere in ``ultragen.eval``) downloads."""

from __future__ import annotations

from pathlib import Path

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INCEPTION_HOME = f"~/.cache/ultragen/{INCEPTION_FILE}"
CLIP_ID = "openai/clip-vit-large-patch14"
CLIP_HOME = "~/.cache/ultragen/clip-vit-large-patch14"

INCEPTION_HOWTO = (f"download {INCEPTION_URL} (torch-fidelity's InceptionV3, the standard FID network) to "
                   f"{INCEPTION_HOME} and pass --inception-weights {INCEPTION_HOME}")
CLIP_HOWTO = (f"run `hf download {CLIP_ID} --local-dir {CLIP_HOME}` on a machine with network and pass "
              f"--clip-model {CLIP_HOME}")


def check_inception_weights(path: Path | None) -> None:
    """Raise ValueError unless ``path`` is an existing file (FID and IS need it)."""
    if path is None:
        raise ValueError(f"FID/IS need the InceptionV3 weights and nothing is downloaded: {INCEPTION_HOWTO}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"--inception-weights {str(path)!r} is not a file: {INCEPTION_HOWTO}")


def check_clip_model(path: Path | None) -> None:
    """Raise ValueError unless ``path`` is a local Hugging Face CLIP folder (config.json and weights)."""
    if path is None:
        raise ValueError(f"CLIP score and CLIP-IQA need a CLIP model and nothing is downloaded: {CLIP_HOWTO}")
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"--clip-model {str(path)!r} is not a Hugging Face model folder (no config.json): "
                         f"{CLIP_HOWTO}")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ValueError(f"--clip-model {str(path)!r} has a config.json but no weights (*.safetensors): "
                         f"{CLIP_HOWTO}")

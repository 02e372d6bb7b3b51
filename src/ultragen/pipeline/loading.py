"""Load models from a Hugging Face id, a local folder, or a tiny name; fail fast and helpfully.

The family (FLUX.1, FLUX.2 [klein]) is read from the model's model_index.json (:mod:`ultragen.family`); the
family's module builds its pipeline with :func:`from_pretrained` below.

No network is touched when ``HF_HUB_OFFLINE=1`` is set; without it a hub id is first looked up in the local cache and
only then downloaded, as diffusers' ``from_pretrained`` does. A missing model raises :class:`MissingWeightsError`
(a ValueError, so the CLI exits 2) that says what to download and where.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)


TINY_RANDOM = "tiny-random"  # the model name of the built-in random-weight pipeline (ultragen.pipeline.tiny)
TINY_RANDOM_KLEIN = "tiny-random-klein"  # the FLUX.2 [klein] one (ultragen.flux2.tiny); -base: its CFG variant


class MissingWeightsError(ValueError):
    """The model's weights are not on this machine (and may not be downloaded)."""


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_path(model: str) -> bool:
    """Hub ids are ``owner/name``; anything else with a path shape is meant as a folder."""
    return model.startswith((".", "/", "~")) or model.endswith("/") or model.count("/") > 1 or "\\" in model


def missing_weights_message(model: str, reason: str) -> str:
    offline = "HF_HUB_OFFLINE=1 is set, which forbids downloads; " if hub_offline() else ""
    return (
        f"model {model!r} is not available here ({reason}); {offline}download it first with "
        f"`hf download {model}` (gated models such as FLUX.1-dev: accept the license on huggingface.co and run "
        f"`hf auth login` first) into the Hugging Face cache ($HF_HOME, default ~/.cache/huggingface), or pass "
        f"--model /path/to/a/folder with model_index.json (a diffusers FLUX.1 or FLUX.2 [klein] "
        f"snapshot); --model {TINY_RANDOM} (or {TINY_RANDOM_KLEIN}) runs offline with random weights"
    )


def normalise_model(model: str) -> str:
    """The model as recorded in caches and LoRAs: an existing folder becomes its absolute path (so a LoRA trained
    on ``./flux-dev`` matches a run given ``/abs/path/flux-dev``); hub ids and ``tiny-random`` stay as they are."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def from_pretrained(cls, model: str, **kwargs):
    """``cls.from_pretrained(model, **kwargs)`` from a folder, the cache, or (online only) the hub."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file() and not (path / "config.json").is_file():
            raise MissingWeightsError(missing_weights_message(model, f"folder {path} has no model_index.json"))
        return cls.from_pretrained(path, **kwargs)
    if _looks_like_path(model):
        raise MissingWeightsError(missing_weights_message(model, f"no folder {path}"))
    try:
        return cls.from_pretrained(model, local_files_only=True, **kwargs)
    except OSError as error:  # huggingface_hub's LocalEntryNotFoundError is an OSError
        if hub_offline():
            raise MissingWeightsError(missing_weights_message(model, "not in the local cache")) from error
    log.info("%s is not cached; downloading from the Hugging Face hub", model)
    try:
        return cls.from_pretrained(model, **kwargs)
    except OSError as error:
        log.debug("download of %s failed: %s", model, error)
        reason = f"not in the local cache, and the download failed: {type(error).__name__}"
        raise MissingWeightsError(missing_weights_message(model, reason)) from error


def load_pipeline(model: str, torch_dtype: torch.dtype = torch.bfloat16):
    """The stock diffusers pipeline of ``model`` (hub id, local folder, or a tiny name), of the family its
    model_index.json names (FluxPipeline: FLUX.1; Flux2KleinPipeline: FLUX.2 [klein])."""
    from ultragen.family import family_of_model

    return family_of_model(model).load_pipeline(model, torch_dtype)


def load_flux_pipeline(model: str, torch_dtype: torch.dtype = torch.bfloat16):
    """A diffusers FluxPipeline for ``model`` (hub id, local folder, or ``tiny-random``)."""
    from ultragen.family import family_named

    return family_named("flux1").load_pipeline(model, torch_dtype)


def load_vae(model: str, torch_dtype: torch.dtype = torch.float32):
    """Only the VAE of ``model`` (for re-decoding a saved latent)."""
    from ultragen.family import family_of_model

    return family_of_model(model).load_vae(model, torch_dtype)


def inspect_model(model: str):
    """The :class:`ultragen.family.ModelInfo` of ``model`` from its config files only; fails (MissingWeightsError)
    where loading it would: a folder without model_index.json or transformer weights, a hub id neither cached nor
    downloadable (with HF_HUB_OFFLINE=1: not cached). Online, a hub id that is not cached gets its small config files
    downloaded."""
    from ultragen.family import family_of_model, tiny_family

    family = family_of_model(model)
    if tiny_family(model) is not None:
        return family.inspect(model, None)
    root = _model_folder(model)
    if not any((root / "transformer").glob("*.safetensors")) and not _weights_come_with_download(model, root):
        raise MissingWeightsError(missing_weights_message(model, f"no transformer weights in {root / 'transformer'}"))
    return family.inspect(model, root)


def model_folder(model: str) -> Path:
    """The folder holding ``model``'s files (see :func:`_model_folder`)."""
    return _model_folder(model)


def _weights_come_with_download(model: str, root: Path) -> bool:
    """A hub id fetched online for its configs only: the weights come with the real run's download."""
    return not Path(model).expanduser().is_dir() and not hub_offline() and not _looks_like_path(model)


def _model_folder(model: str) -> Path:
    """The folder holding ``model``'s files: the folder itself, its cached snapshot, or (online) a fresh snapshot of
    its config files."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if _looks_like_path(model):
        raise MissingWeightsError(missing_weights_message(model, f"no folder {path}"))
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, local_files_only=True))
    except Exception as error:  # LocalEntryNotFoundError, or a malformed id (HFValidationError)
        if hub_offline():
            raise MissingWeightsError(missing_weights_message(model, "not in the local cache")) from error
    try:
        return Path(snapshot_download(model, allow_patterns=["*.json", "*.txt"]))
    except Exception as error:  # network, authentication (gated model), unknown repository
        reason = f"not in the local cache, and its config files could not be downloaded: {type(error).__name__}"
        raise MissingWeightsError(missing_weights_message(model, reason)) from error


def read_json(model: str, path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise MissingWeightsError(missing_weights_message(model, f"cannot read {path} ({error})")) from None


_from_pretrained = from_pretrained  # the former name (ultragen.train uses it)


def __getattr__(name: str):
    if name == "ModelInfo":  # moved to ultragen.family with the family seam
        from ultragen.family import ModelInfo

        return ModelInfo
    raise AttributeError(f"module 'ultragen.pipeline.loading' has no attribute {name!r}")

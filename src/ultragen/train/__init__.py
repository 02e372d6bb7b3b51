"""Guide-LoRA training: ``prepare_cache`` (images -> latent/text cache) and ``train`` (flow matching).

Imports are lazy: ``ultragen.train.config`` is cheap; the loop pulls in accelerate and diffusers.
"""

from ultragen.train.config import Optimizer, PrepareConfig, TrainConfig

__all__ = ["Optimizer", "PrepareConfig", "TrainConfig", "prepare_cache", "read_loss_log", "train"]


def __getattr__(name: str):
    if name == "prepare_cache":
        from ultragen.train.prepare import prepare_cache

        return prepare_cache
    if name == "train":
        from ultragen.train.loop import train

        return train
    if name == "read_loss_log":
        from ultragen.train.rundir import read_loss_log

        return read_loss_log
    raise AttributeError(f"module 'ultragen.train' has no attribute {name!r}")

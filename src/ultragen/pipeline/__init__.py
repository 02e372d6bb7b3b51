"""Two-stage generation: a guide with the stock model, then hierarchical hires passes, then a tiled decode.

``UltraGenPipeline`` is the Python API (diffusers style); ``GenerationConfig`` holds every setting; ``generate_files``
is what ``ultragen generate`` runs (files, metadata, atomic writes); ``decode_file`` re-decodes a saved latent.
"""

from ultragen.pipeline.config import GenerationConfig, ModelDefaults, ModelFamily
from ultragen.pipeline.loading import TINY_RANDOM, MissingWeightsError

__all__ = [
    "GenerationConfig",
    "MissingWeightsError",
    "ModelDefaults",
    "ModelFamily",
    "TINY_RANDOM",
    "UltraGenOutput",
    "UltraGenPipeline",
]


def __getattr__(name: str):
    # the pipeline imports diffusers' FluxPipeline (slow); config validation and the CLI's checks do not need it
    if name in ("UltraGenPipeline", "UltraGenOutput"):
        from ultragen.pipeline import two_stage

        return getattr(two_stage, name)
    raise AttributeError(f"module 'ultragen.pipeline' has no attribute {name!r}")

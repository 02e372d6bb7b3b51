"""The FLUX adapter: diffusers' FLUX transformer run as a three-stream hierarchical model."""

from ultragen.flux.transformer import HierFluxTransformer

__all__ = ["HierFluxTransformer"]

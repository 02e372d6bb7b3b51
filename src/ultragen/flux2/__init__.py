"""The FLUX.2 [klein] adapter: diffusers' Flux2Transformer2DModel run as a three-stream hierarchical model."""

from ultragen.flux2.transformer import HierFlux2Transformer

__all__ = ["HierFlux2Transformer"]

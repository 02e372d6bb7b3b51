"""ultragen: fast 2K-8K+ images from pretrained FLUX transformers with hierarchical local attention."""

__version__ = "0.1.0"

"""The quality testbed: a small FLUX-architecture model trained here on procedural scenes (see docs/design.md).

scenes: scene generator, captions and analytic renderer; latent: the fixed invertible image <-> latent transform;
text: the caption encoder; metrics: the rule-based detector, seam ratio and guide PSNR; model: the model configs.
"""

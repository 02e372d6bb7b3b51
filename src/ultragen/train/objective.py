"""Flow matching for the guide LoRA, with every random draw a pure function of (seed, step, micro-step, rank).

x_t = (1 - t) x0 + t eps, target v = eps - x0, t = sigmoid(n) with n ~ N(mean, std^2) (logit-normal). The guide
enters clean, at t = 0; the loss is the MSE over hires tokens only. Because nothing depends on hidden RNG state,
a run stopped at step s and resumed computes exactly the batches the uninterrupted run would have.
The model is the family's hierarchical transformer, called through ``ModelFamily.train_velocity`` (any family).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ultragen.family import ModelFamily, Prompt, family_named
from ultragen.layout import HierLayout
from ultragen.policy import AttentionPlan
from ultragen.train.cache import CacheBatch, TrainingCache

_STEP_PRIME = 1_000_003
VAL_TIMESTEPS = (0.25, 0.5, 0.75)  # the validation loss is the mean over these t, with fixed noise per item
VAL_SEED = 20_251_107  # validation noise does not depend on the training seed: runs stay comparable


def step_generator(seed: int, step: int, micro: int = 0, rank: int = 0) -> torch.Generator:
    """The CPU generator of one micro-batch: seeded by (seed, step, micro-step, process rank) only."""
    key = ((seed * _STEP_PRIME + step) * 65_537 + micro) * 1_031 + rank
    return torch.Generator("cpu").manual_seed(key % (2**63 - 1))


@dataclass(frozen=True)
class Sampler:
    """Which cached items a micro-batch reads: each epoch is a permutation of the training items seeded by
    (seed, epoch); position p of the global sample stream is item ``perm[p mod n]`` of epoch ``p // n``."""

    train_items: tuple[int, ...]
    seed: int
    batch_size: int
    grad_accum: int
    world_size: int

    def items(self, step: int, micro: int, rank: int) -> list[int]:
        n = len(self.train_items)
        first = ((step * self.grad_accum + micro) * self.world_size + rank) * self.batch_size
        out = []
        for position in range(first, first + self.batch_size):
            epoch, offset = divmod(position, n)
            out.append(self.train_items[_epoch_order(n, self.seed, epoch)[offset]])
        return out


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator("cpu").manual_seed(seed * _STEP_PRIME + epoch)).tolist()


@dataclass(frozen=True)
class Noised:
    """One micro-batch ready for the model, hires in window-first and guide in tile-first order."""

    x_t: torch.Tensor  # (B, N, C)
    target: torch.Tensor  # (B, N, C) eps - x0
    t: torch.Tensor  # (B,) sigma in [0, 1]
    guide: torch.Tensor  # (B, G, C) clean
    text: torch.Tensor  # (B, T, D)
    pooled: torch.Tensor  # (B, P); P = 0 for families without a pooled embedding (FLUX.2)


def noise_batch(batch: CacheBatch, layout: HierLayout, t: torch.Tensor, eps: torch.Tensor) -> Noised:
    x0 = batch.hires.float()
    t3 = t.view(-1, 1, 1)
    x_t = (1 - t3) * x0 + t3 * eps
    return Noised(layout.hires_to_sequence(x_t), layout.hires_to_sequence(eps - x0), t,
                  layout.guide_to_sequence(batch.guide.float()), batch.text, batch.pooled)


def draw(cache: TrainingCache, batch: CacheBatch, layout: HierLayout, g: torch.Generator, caption_dropout: float,
         logit_mean: float, logit_std: float) -> Noised:
    """The random parts of a training micro-batch, in a fixed order from ``g``: caption drop, t, noise."""
    b = batch.hires.shape[0]
    drop = torch.rand(b, generator=g) < caption_dropout
    if drop.any():
        text, pooled = batch.text.clone(), batch.pooled.clone()
        text[drop] = cache.empty_text.to(text.dtype)
        pooled[drop] = cache.empty_pooled.to(pooled.dtype)
        batch = CacheBatch(batch.hires, batch.guide, text, pooled)
    t = torch.sigmoid(torch.randn(b, generator=g) * logit_std + logit_mean)
    eps = torch.randn(batch.hires.shape, generator=g)
    return noise_batch(batch, layout, t, eps)


def _family(family: ModelFamily | None) -> ModelFamily:
    return family if family is not None else family_named("flux1")


def flow_loss(model, noised: Noised, plan: AttentionPlan, guidance: float | None, device: torch.device,
              dtype: torch.dtype, family: ModelFamily | None = None) -> torch.Tensor:
    """MSE between the predicted and the target velocity over the hires tokens (a float32 scalar). ``model``: the
    hierarchical transformer of ``family`` (None: FLUX.1), possibly wrapped for data parallelism."""
    b = noised.x_t.shape[0]
    pooled = noised.pooled.to(device, dtype) if noised.pooled.shape[-1] else None
    pred = _family(family).train_velocity(
        model, noised.x_t.to(device, dtype), Prompt(noised.text.to(device, dtype), pooled),
        noised.t.to(device, dtype), plan, noised.guide.to(device, dtype),
        None if guidance is None else torch.full((b,), guidance, device=device, dtype=dtype),
    )
    return torch.nn.functional.mse_loss(pred.float(), noised.target.to(device).float())


@torch.no_grad()
def validation_loss(model, cache: TrainingCache, val_items: list[int], layout: HierLayout, plan: AttentionPlan,
                    guidance: float | None, device: torch.device, dtype: torch.dtype,
                    family: ModelFamily | None = None) -> float:
    """Deterministic held-out loss: every validation item at each t of VAL_TIMESTEPS with its own fixed noise and
    its real caption. Equal weights give equal values, whatever the seed or the step."""
    losses = []
    for item in val_items:
        batch = cache.load([item])
        g = torch.Generator("cpu").manual_seed(VAL_SEED + item)
        for t in VAL_TIMESTEPS:
            eps = torch.randn(batch.hires.shape, generator=g)
            noised = noise_batch(batch, layout, torch.tensor([t]), eps)
            losses.append(float(flow_loss(model, noised, plan, guidance, device, dtype, family)))
    return sum(losses) / len(losses)

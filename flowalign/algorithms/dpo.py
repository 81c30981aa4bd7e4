"""Preference optimization of diffusion and flow models: Diffusion-DPO, Flow-DPO, InPO.

For a pair (winner ``w``, loser ``l``) noised with the same ``t`` and noise, with per-sample denoising errors
``e = mean_d (pred - target)^2`` of the trained model and of the reference:

    inside = -beta / 2 * [(e_w - e_w_ref) - (e_l - e_l_ref)]
    loss   = -log sigmoid(inside)

- Diffusion-DPO (Wallace et al. 2023, Eq. 14; reference ``SalesforceAIResearch/DiffusionDPO`` ``train.py``,
  ``scale_term = -0.5 * beta_dpo``): epsilon (or v) targets, ``beta`` ~ 2000-5000 for SD1.5/SDXL. The paper's
  ``T * omega(lambda_t)`` factor is folded into ``beta`` as in the reference code.
- Flow-DPO (flow_grpo ``train_sd3_dpo.py``): velocity target ``eps - x0``, logit-normal ``t``, ``beta`` = 100.
- InPO (Lu et al. 2025): the noised latent comes from a DDIM inversion of the data by the model and the
  target noise is the one that latent implies; the loss is the same.

``implicit accuracy``: the share of pairs with ``inside > 0`` (the model prefers the winner more than the
reference does). The loss is ``log 2`` when the model equals the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["dpo_loss", "denoising_error"]


def denoising_error(prediction: Tensor, target: Tensor) -> Tensor:
    """``[B]`` mean squared error over all but the batch dimension, in float32."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)


def dpo_loss(
    model_error_w: Tensor, model_error_l: Tensor, ref_error_w: Tensor, ref_error_l: Tensor, beta: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO loss of ``P`` pairs from their ``[P]`` denoising errors; returns ``(loss, metrics)``."""
    shapes = {t.shape for t in (model_error_w, model_error_l, ref_error_w, ref_error_l)}
    if len(shapes) != 1 or next(iter(shapes)) != (model_error_w.shape[0],):
        raise ValueError(f"the four error tensors must all be [P]; got {sorted(tuple(s) for s in shapes)}.")
    if beta <= 0:
        raise ValueError(f"DPO beta must be > 0, got {beta}.")
    w_diff = model_error_w - ref_error_w.detach()
    l_diff = model_error_l - ref_error_l.detach()
    inside = -0.5 * beta * (w_diff - l_diff)
    loss = -F.logsigmoid(inside).mean()
    with torch.no_grad():
        metrics = {
            "loss": loss.detach(),
            "implicit_accuracy": (inside > 0).float().mean(),
            "model_error_w": model_error_w.mean(),
            "model_error_l": model_error_l.mean(),
            "reward_margin": inside.mean(),
        }
    return loss, metrics

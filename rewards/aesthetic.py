"""LAION aesthetic predictor v2 (C. Schuhmann, repository christophschuhmann/improved-aesthetic-predictor,
``simple_inference.py``; the head ``sac+logos+ava1-l14-linearMSE.pth``), the ``aesthetic`` reward as
DDPO, AlignProp and Flow-GRPO use it.

``score = MLP(e / ||e||)`` where ``e`` is the CLIP ViT-L/14 projected image embedding (768-d) and the MLP is
``Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1),
Linear(64, 16), Linear(16, 1)`` -- no activations, so in eval mode it is one affine map; the layer indices
(``layers.0/2/4/6/7``) match the public state dict. Scale: the AVA-style 1-10 rating the head was trained
on (typical photos ~4-6.5). Differentiable: CLIP preprocessing (shorter side 224, bicubic, centre crop,
OpenAI mean/std) runs on tensors and the MLP has no ``no_grad`` (unlike Flow-GRPO's copy).

Weights from user paths: ``head_path`` (the ``.pth`` read with ``torch.load(weights_only=True)``, or a
``.safetensors`` with the same keys) and ``clip_path`` (OpenAI CLIP ViT-L/14: a transformers
``openai/clip-vit-large-patch14`` directory, or ``backend="open_clip"`` with ``ViT-L-14`` and its OpenAI
checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rewards.base import Reward, RewardOutput, flatten_frames
from rewards.clip_models import ClipTowers, load_clip
from rewards.weights import RewardWeightsError, load_state_dict, require_path

__all__ = ["AestheticMLP", "AestheticReward"]

HEAD_HINT = (
    "The LAION head is sac+logos+ava1-l14-linearMSE.pth from christophschuhmann/improved-aesthetic-predictor "
    "(also shipped in flow_grpo/assets); download it once and pass its path."
)


class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor head: 768-1024-128-64-16-1 linear layers with dropout, no activations."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embedding: Tensor) -> Tensor:
        """``[N, embed_dim]`` (already L2-normalized) -> ``[N]``."""
        return self.layers(embedding).squeeze(-1)


class AestheticReward(Reward):
    """LAION aesthetic score of the image (the prompt is not used). See the module docstring."""

    name = "aesthetic"
    differentiable = True

    def __init__(
        self,
        head_path: str | Path | None = None,
        clip_path: str | Path | None = None,
        backend: str = "transformers",
        checkpoint: str | Path | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        head_file = require_path(
            head_path, "head_path", "the LAION aesthetic MLP head", HEAD_HINT, kind="file"
        )
        self.towers: ClipTowers = load_clip(
            clip_path, backend, checkpoint=checkpoint, device=self.device, dtype=self.dtype
        )
        state = load_state_dict(
            head_file, "head_path", "the LAION aesthetic MLP head (layers.0 ... layers.7)"
        )
        first = state.get("layers.0.weight")
        if first is None:
            raise RewardWeightsError(
                f"head_path={str(head_path)!r} has keys {sorted(state)[:6]}..., expected the improved-aesthetic-predictor "
                f"state dict with layers.0.weight ... layers.7.bias. {HEAD_HINT}"
            )
        self.mlp = AestheticMLP(embed_dim=first.shape[1])
        try:
            self.mlp.load_state_dict(state)
        except RuntimeError as err:
            raise RewardWeightsError(
                f"head_path={str(head_path)!r} does not fit the aesthetic MLP: {err}"
            ) from err
        self.mlp.eval().requires_grad_(False).to(device=self.device, dtype=self.dtype)

    def modules(self) -> list[torch.nn.Module]:
        return [self.towers.model, self.mlp]

    def score_batch(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        frames, n_frames = flatten_frames(images)
        embedding = self.towers.encode_images(frames)
        embedding = embedding / torch.linalg.vector_norm(embedding, dim=-1, keepdim=True)
        scores = self.mlp(embedding.to(self.dtype)).float()
        return RewardOutput(scores.view(len(prompts), n_frames).mean(dim=1))

"""The ``shapes_match`` reward: a small differentiable prompt-image agreement model for the shapes world.

``score = sigmoid(logit / temperature)`` = the model's probability that GenEval's rules would judge the
32x32 image correct for the prompt, in [0, 1]; higher is better. It is the shapes world's stand-in for
CLIP in demos of reward backprop (AlignProp, DRaFT) and noise optimization (ReNO): gradients reach the
images. The shipped weights, their training data and their held-out accuracy are described in
``assets/shapes/rewards/README.md``; ``python -m flowalign.worlds.shapes.train_rewards match`` trains them.

**Architecture** (:class:`ShapesMatchModel`, 0.24 M parameters with the shipped sizes):

- *Text*: a word-level vocabulary (the shapes world's prompt words, stored in the weights file, so this
  package needs nothing from :mod:`flowalign`), ``[cls] w_1 ... w_n`` with learned token and position
  embeddings, ``text_layers`` pre-LN transformer layers.
- *Image*: a three-layer CNN (5x5 stride 2, 3x3 stride 2, 3x3) turning the image into an 8x8 grid of
  ``width``-dim cell features; each cell's position is its centre refined by a predicted offset (the
  trainer supervises it with the detected object centres).
- *Joint scorer*: ``rounds`` x [counting cross-attention, one transformer layer over the text]. The
  counting cross-attention (:class:`CountingCrossAttention`) is sigmoid cross-attention (each text token
  scores every cell independently, ``m = sigmoid(q.k / sqrt(d) + b)``) with sum aggregation: a token reads
  the soft count ``sum m`` of the cells it matches, their soft centroid and their mean value. Softmax
  attention normalizes counts away; summing keeps them. The text layer's displacement heads
  (:class:`TransformerLayer`) let a token read the difference of two other tokens' centroids, picked by
  position, so left/right/above/below become a comparison that does not depend on which shapes are
  named. The ``[cls]`` token's final state gives the logit.

**Scores and gradients.** The model was trained with label smoothing (targets 0.025 / 0.975), which bounds
confident logits near ``+-log(0.975 / 0.025) = +-3.7`` instead of letting them grow without limit, so
``sigmoid`` stays out of saturation (its slope is >= 0.024 at those logits) and gradients stay alive for
confident images too. ``temperature`` (default: the value stored with the weights) divides the logit
before the sigmoid; a larger one gives smoother, weaker gradients without changing the ranking or the 0.5
decision. ``details["logit"]`` is the raw logit.

**Input.** Images ``[B, 3, 32, 32]`` (or video ``[B, T, 3, 32, 32]``, scored per frame and averaged) in
[0, 1]; prompts made of the vocabulary's words (case and the punctuation ``.,;:!?`` are ignored). Other
image sizes and unknown words raise :class:`~rewards.base.RewardInputError`: the model only knows the shapes
world. ``metadata`` is not read.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rewards.base import Reward, RewardInputError, RewardOutput, flatten_frames
from rewards.weights import RewardWeightsError, read_config_metadata, require_path

__all__ = [
    "DEFAULT_WEIGHTS",
    "FORMAT",
    "SPECIAL_TOKENS",
    "CountingCrossAttention",
    "MatchOutput",
    "ShapesMatchConfig",
    "ShapesMatchModel",
    "ShapesMatchReward",
    "load_match_model",
    "save_match_model",
    "tokenize",
]

FORMAT = "flowalign.shapes_match/1"
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<cls>")
"""Token ids 0 and 1; the vocabulary's words follow from id 2."""
DEFAULT_WEIGHTS = (
    Path(__file__).resolve().parents[1] / "assets" / "shapes" / "rewards" / "shapes_match.safetensors"
)
"""The shipped weights (repository root relative to this package, like the rest of the project's assets)."""
TRAIN_HINT = (
    "Train weights with `python -m flowalign.worlds.shapes.train_rewards match --out FILE.safetensors`, "
    "or leave weights_path unset to use the shipped ones."
)
_PUNCTUATION = re.compile(r"[.,;:!?]")


@dataclass(frozen=True)
class ShapesMatchConfig:
    """Sizes of a :class:`ShapesMatchModel` (stored as JSON in the weights file's metadata).

    Attributes:
        vocabulary: the words, in id order from 2 (ids 0 and 1 are :data:`SPECIAL_TOKENS`).
        max_words: longest prompt in words.
        width: feature size of text tokens and image cells.
        heads: attention heads of the text transformer layers.
        text_layers: transformer layers of the text encoder.
        rounds: [counting cross-attention, text layer] rounds of the joint scorer.
        value_dim: size of the value vectors the counting cross-attention averages.
        max_count: the counting cross-attention encodes soft counts 0..max_count.
        displacement_heads: displacement heads of the joint text layers (0: none).
        image_size: the side of the square images the model takes.
        temperature: default divisor of the logit before the sigmoid.
    """

    vocabulary: tuple[str, ...]
    max_words: int = 15
    width: int = 64
    heads: int = 4
    text_layers: int = 2
    rounds: int = 2
    value_dim: int = 32
    max_count: int = 5
    displacement_heads: int = 2
    image_size: int = 32
    temperature: float = 1.0

    @property
    def grid(self) -> int:
        """Cells per side of the image feature grid (the CNN downsamples by 4)."""
        return self.image_size // 4


def tokenize(prompts: Sequence[str], vocabulary: Sequence[str], max_words: int) -> Tensor:
    """``[B, max_words + 1]`` int64 token ids: ``<cls>``, the words, ``<pad>`` (0) after them.

    Raises :class:`RewardInputError` naming the prompt for a word outside ``vocabulary`` or a prompt
    longer than ``max_words`` words.
    """
    index = {word: i + len(SPECIAL_TOKENS) for i, word in enumerate(vocabulary)}
    ids = torch.zeros(len(prompts), max_words + 1, dtype=torch.long)
    ids[:, 0] = SPECIAL_TOKENS.index("<cls>")
    for row, prompt in enumerate(prompts):
        words = _PUNCTUATION.sub(" ", str(prompt).lower()).split()
        unknown = [w for w in words if w not in index]
        if unknown:
            raise RewardInputError(
                f"shapes_match: prompt {prompt!r} has words outside the shapes world's vocabulary: {unknown}. "
                f"The model knows only the words {sorted(index)}; score other prompts with a general "
                "image-text reward such as 'clip'."
            )
        if len(words) > max_words:
            raise RewardInputError(
                f"shapes_match: prompt {prompt!r} has {len(words)} words; the model takes at most {max_words}."
            )
        ids[row, 1 : len(words) + 1] = torch.tensor([index[w] for w in words], dtype=torch.long)
    return ids


class TransformerLayer(nn.Module):
    """Pre-LN self-attention over the text tokens + GELU MLP (hidden ``2 * width``).

    With ``displacement_heads > 0`` it also carries the scorer's displacement heads. Each head lets token
    ``i`` pick two tokens by *position* -- softmax attentions ``a_i`` and ``b_i`` whose queries come from
    the token's features and whose keys are the position embeddings only -- and receive
    ``sum_j a_ij c_j - sum_j b_ij c_j``, the displacement between the image centroids the counting
    cross-attention gave them. "A left of B" thus becomes "the noun before me minus the noun after me",
    a rule that does not depend on which shapes A and B are, so it carries over to pairs and orders the
    training prompts never showed.
    """

    def __init__(self, width: int, heads: int, displacement_heads: int = 0, key_dim: int = 16):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.displacement_heads = displacement_heads
        self.key_dim = key_dim
        if displacement_heads:
            self.displacement_query = nn.Linear(width, 2 * displacement_heads * key_dim)
            self.displacement_key = nn.Linear(width, 2 * displacement_heads * key_dim)
            self.displacement_out = nn.Linear(displacement_heads * 2, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(
        self,
        x: Tensor,
        padding: Tensor,
        centroids: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """``x [B, T, width]``, ``padding [B, T]`` (True: pad), ``centroids [B, T, 2]``, ``positions [T, width]``
        (the position embeddings) -> ``[B, T, width]``."""
        h = self.norm1(x)
        x = x + self.attention(h, h, h, key_padding_mask=padding, need_weights=False)[0]
        if self.displacement_heads and centroids is not None and positions is not None:
            b, t, _ = x.shape
            g, k = 2 * self.displacement_heads, self.key_dim
            q = self.displacement_query(h).view(b, t, g, k).transpose(1, 2)  # [B, 2H, T, k]
            keys = self.displacement_key(positions).view(1, t, g, k).transpose(1, 2)  # [1, 2H, T, k]
            scores = (q @ keys.transpose(-1, -2) / math.sqrt(k)).masked_fill(
                padding[:, None, None, :], float("-inf")
            )
            picked = scores.softmax(dim=-1) @ centroids[:, None]  # [B, 2H, T, 2]
            displacement = picked[:, 0::2] - picked[:, 1::2]  # [B, H, T, 2]
            x = x + self.displacement_out(displacement.transpose(1, 2).reshape(b, t, -1))
        return x + self.mlp(self.norm2(x))


class CountingCrossAttention(nn.Module):
    """Text tokens read the image cells they match: sigmoid cross-attention with sum aggregation.

    For token ``i`` and cell ``j``: ``m_ij = sigmoid(q_i . k_j / sqrt(width) + b)``. With the soft count
    ``n_i = sum_j m_ij``, the token receives (residually) ``W_o [sum_j m_ij v_j / (1 + n_i), rbf(n_i),
    c_i]``, where ``rbf(n) = exp(-(n - k)^2 / 0.5)`` for ``k = 0..max_count`` encodes the count so that
    "is it three?" is linear, and ``c_i = sum_j m_ij p_j / (n_i + 1e-3)`` is the soft centroid of the
    matched cells' positions ``p_j``.
    """

    def __init__(self, width: int, value_dim: int, max_count: int = 5, bias: float = -4.0):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, value_dim)
        self.bias = nn.Parameter(torch.tensor(bias))  # starts sparse: m ~ 0.02 per cell
        self.register_buffer("levels", torch.arange(max_count + 1, dtype=torch.float32), persistent=False)
        self.out = nn.Linear(value_dim + max_count + 1 + 2, width)

    def forward(self, text: Tensor, cells: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``text [B, T, width]``, ``cells [B, N, width]``, ``positions [B, N, 2]`` ->
        (``text [B, T, width]``, match logits ``[B, T, N]``, centroids ``[B, T, 2]``)."""
        q, k = self.query(self.norm(text)), self.key(cells)
        logits = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]) + self.bias
        match = torch.sigmoid(logits)
        count = match.sum(dim=-1, keepdim=True)
        value = match @ self.value(cells) / (count + 1)
        centroid = match @ positions / (count + 1e-3)
        count_code = torch.exp(-((count - self.levels.to(count.dtype)) ** 2) / 0.5)
        return text + self.out(torch.cat([value, count_code, centroid], dim=-1)), logits, centroid


@dataclass
class MatchOutput:
    """Everything one forward pass computes (the trainer supervises the intermediate parts).

    Attributes:
        logits: ``[B]`` match logits (positive: the image matches the prompt).
        cells: ``[B, N, width]`` image cell features, ``N = grid^2`` in row-major order.
        offsets: ``[B, N, 2]`` each cell's predicted (x, y) offset of an object centre from the cell
            centre, in [-1, 1] (units of half a cell).
        match_logits: per round, ``[B, T, N]`` the counting cross-attention's logits.
    """

    logits: Tensor
    cells: Tensor
    offsets: Tensor
    match_logits: list[Tensor]


class ShapesMatchModel(nn.Module):
    """Prompt-image agreement logits for the shapes world (architecture in the module docstring)."""

    def __init__(self, config: ShapesMatchConfig):
        super().__init__()
        self.config = config
        width = config.width
        if config.image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {config.image_size}.")
        self.cnn = nn.Sequential(
            nn.Conv2d(3, 32, 5, stride=2, padding=2),
            nn.GELU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(64, width, 3, padding=1),
        )
        self.cell_norm = nn.LayerNorm(width)
        self.offset = nn.Linear(width, 2)
        self.token_embedding = nn.Embedding(len(SPECIAL_TOKENS) + len(config.vocabulary), width)
        self.position_embedding = nn.Embedding(config.max_words + 1, width)
        self.text_layers = nn.ModuleList(
            TransformerLayer(width, config.heads) for _ in range(config.text_layers)
        )
        self.cross = nn.ModuleList(
            CountingCrossAttention(width, config.value_dim, config.max_count) for _ in range(config.rounds)
        )
        self.joint_layers = nn.ModuleList(
            TransformerLayer(width, config.heads, config.displacement_heads) for _ in range(config.rounds)
        )
        self.final_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 1)
        g = config.grid
        ys, xs = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
        # Pixel coordinates of each 4x4 cell's centre.
        self.register_buffer(
            "cell_centres", torch.stack([xs, ys], dim=-1).view(g * g, 2) * 4.0 + 1.5, persistent=False
        )

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """Token ids of ``prompts`` for :meth:`forward` (see :func:`tokenize`)."""
        return tokenize(prompts, self.config.vocabulary, self.config.max_words)

    def forward(self, images: Tensor, token_ids: Tensor) -> Tensor:
        """``images [B, 3, S, S]`` in [0, 1], ``token_ids [B, L]`` -> logits ``[B]`` (positive: match)."""
        return self.run(images, token_ids).logits

    def run(self, images: Tensor, token_ids: Tensor) -> MatchOutput:
        """The forward pass with its intermediate results (see :class:`MatchOutput`)."""
        cells = self.cell_norm(self.cnn(images * 2 - 1).flatten(2).transpose(1, 2))
        offsets = torch.tanh(self.offset(cells))
        half = (self.config.image_size - 1) / 2
        positions = (self.cell_centres.to(cells.dtype) + 2 * offsets) / half - 1  # [B, N, 2] in [-1, 1]
        padding = token_ids == 0
        position_embeddings = self.position_embedding.weight[: token_ids.shape[1]]
        text = self.token_embedding(token_ids) + position_embeddings
        for layer in self.text_layers:
            text = layer(text, padding)
        match_logits = []
        for cross, layer in zip(self.cross, self.joint_layers, strict=True):
            text, logits, centroids = cross(text, cells, positions)
            match_logits.append(logits)
            text = layer(text, padding, centroids, position_embeddings)
        logits = self.head(self.final_norm(text[:, 0])).squeeze(-1)
        return MatchOutput(logits, cells, offsets, match_logits)


def save_match_model(
    model: ShapesMatchModel, path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write the weights, the config and the vocabulary (JSON metadata) to a ``.safetensors`` file."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config = asdict(model.config)
    save_file(state, str(path), metadata={**(metadata or {}), "format": FORMAT, "config": json.dumps(config)})


def load_match_model(path: str | Path) -> ShapesMatchModel:
    """Read a model written by :func:`save_match_model`; frozen, in eval mode."""
    from safetensors.torch import load_file

    file = require_path(path, "weights_path", "shapes_match weights (.safetensors)", TRAIN_HINT, kind="file")
    raw = read_config_metadata(path, file, FORMAT, "a shapes_match model", TRAIN_HINT)
    model = ShapesMatchModel(ShapesMatchConfig(**{**raw, "vocabulary": tuple(raw["vocabulary"])}))
    model.load_state_dict(load_file(str(file)))
    return model.eval().requires_grad_(False)


class ShapesMatchReward(Reward):
    """Probability that the image matches the prompt under the shapes-world agreement model.

    Args:
        weights_path: a file written by :func:`save_match_model`; None loads the shipped weights
            (:data:`DEFAULT_WEIGHTS`).
        temperature: divisor of the logit before the sigmoid (> 0); None uses the value stored with the
            weights.
    """

    name = "shapes_match"
    differentiable = True

    def __init__(
        self, weights_path: str | Path | None = None, temperature: float | None = None, **kwargs: Any
    ):
        super().__init__(**kwargs)
        if weights_path is None and not DEFAULT_WEIGHTS.is_file():
            raise RewardWeightsError(
                f"{self.name}: the shipped weights are missing ({DEFAULT_WEIGHTS}); they live in the repository's "
                f"assets/ folder, which a wheel install does not include. Use a clone of the repository or pass "
                f"weights_path. {TRAIN_HINT}"
            )
        self.model = load_match_model(DEFAULT_WEIGHTS if weights_path is None else weights_path).to(
            device=self.device, dtype=self.dtype
        )
        self.temperature = self.model.config.temperature if temperature is None else float(temperature)
        if not self.temperature > 0:
            raise ValueError(f"{self.name}: temperature must be > 0, got {temperature!r}.")

    def modules(self) -> list[nn.Module]:
        return [self.model]

    def score_batch(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        size = self.model.config.image_size
        if tuple(images.shape[-2:]) != (size, size):
            raise RewardInputError(
                f"{self.name}: the model scores {size}x{size} shapes-world images, got "
                f"{images.shape[-2]}x{images.shape[-1]} (shape {tuple(images.shape)}); render or decode at "
                f"{size}x{size} instead of resizing other images."
            )
        frames, n_frames = flatten_frames(images)
        token_ids = self.model.tokenize(prompts).to(self.device).repeat_interleave(n_frames, dim=0)
        logits = self.model(frames.to(self.dtype), token_ids).float().view(len(prompts), n_frames)
        scores = torch.sigmoid(logits / self.temperature).mean(dim=1)
        return RewardOutput(scores, details={"logit": logits.detach().mean(dim=1)})

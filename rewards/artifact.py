"""A lightweight artifact classifier on frozen image features, the ``artifact`` reward, and its trainer.

``score = sigmoid(head(standardize(features(x))))`` = the classifier's probability that the image is
*clean* (no artifact), in [0, 1]; higher is better. Differentiable: the resize, the features and the head
are torch ops, so gradients reach the images.

**Frozen features.** :class:`RandomConvFeatures` is a fixed random convolutional network (three stride-2
3x3 conv + ReLU stages, 16/32/64 channels, Kaiming-normal weights drawn from a seed), applied to the image
resized to ``image_size`` (bilinear, antialiased); per stage the spatial mean and standard deviation of
every channel are the features (224 numbers); ``ArtifactConfig.statistics`` can add the spatial maximum,
which keeps a small local defect (a hole, a speck) from being averaged away. Random convolutional
features are a classic no-training image descriptor (Jarrett et al. 2009; Saxe et al. 2011, "On Random
Weights and Unsupervised Feature Learning"): they capture local colour, edge and texture statistics -- blur, noise, blotches, colour
bleeding -- which is what generation artifacts change, and they need no download. The extractor's
weights are saved inside the weights file with the head, so a file scores identically on any machine.

**Head.** A small MLP (``hidden`` units, ReLU; ``hidden=0`` is logistic regression) on the standardized
features (the training set's per-feature mean and std, stored in the file), trained with full-batch Adam
and binary cross-entropy.

**Training** from two folders of images::

    python -m rewards.artifact train --clean DIR --artifact DIR --out artifact.safetensors

prints the train/validation accuracy and writes a ``.safetensors`` file (tensors + a JSON config in its
metadata).

**Presets.** ``weights_path`` is required; besides a file it may name a preset of :data:`PRESETS`:
``weights_path="shapes"`` loads the shapes world's classifier shipped in
``assets/shapes/rewards/artifact_shapes.safetensors`` (clean renders vs. noise, broken and merged shapes,
blur / colour bleeding and off-palette colours on 32x32 scenes; trained by
``python -m flowalign.worlds.shapes.train_rewards artifact``, card in ``assets/shapes/rewards/README.md``).
It is a preset rather than the default because it only knows the shapes world: on other images its
score means nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rewards.base import Reward, RewardOutput, flatten_frames
from rewards.weights import RewardWeightsError, read_config_metadata, require_path

__all__ = [
    "ArtifactClassifier",
    "ArtifactConfig",
    "ArtifactReward",
    "PRESETS",
    "RandomConvFeatures",
    "TrainReport",
    "load_classifier",
    "train_artifact_classifier",
]

FORMAT = "flowalign-artifact-v1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TRAIN_HINT = "Train one with: python -m rewards.artifact train --clean DIR --artifact DIR --out FILE"
STATISTICS: tuple[str, ...] = ("mean", "std", "max")
_ASSETS = Path(__file__).resolve().parents[1] / "assets"
PRESETS: dict[str, Path] = {"shapes": _ASSETS / "shapes" / "rewards" / "artifact_shapes.safetensors"}
"""Named weights shipped with the project: ``weights_path="shapes"`` is the shapes world's classifier
(repository root relative to this package, like the rest of the project's assets)."""


@dataclass(frozen=True)
class ArtifactConfig:
    """What a weights file needs besides its tensors (stored as JSON in the safetensors metadata)."""

    image_size: int = 64
    channels: tuple[int, ...] = (16, 32, 64)
    hidden: int = 64
    seed: int = 0
    statistics: tuple[str, ...] = ("mean", "std")
    """Per-channel spatial statistics of each stage, from :data:`STATISTICS`; files written before this
    field existed hold mean and std."""

    def __post_init__(self) -> None:
        unknown = [s for s in self.statistics if s not in STATISTICS]
        if unknown or not self.statistics:
            raise ValueError(
                f"ArtifactConfig.statistics must be a non-empty subset of {STATISTICS}, got {self.statistics!r}."
            )

    @property
    def feature_dim(self) -> int:
        return len(self.statistics) * sum(self.channels)


class RandomConvFeatures(nn.Module):
    """Frozen random conv features: per stage, spatial statistics (mean, std, optionally max) of each channel."""

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 64),
        seed: int = 0,
        statistics: Sequence[str] = ("mean", "std"),
    ):
        super().__init__()
        self.statistics = tuple(statistics)
        generator = torch.Generator().manual_seed(seed)
        layers = []
        in_channels = 3
        for out_channels in channels:
            conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1)
            with torch.no_grad():
                fan_in = in_channels * 9
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (2 / fan_in) ** 0.5)
                conv.bias.zero_()
            layers.append(conv)
            in_channels = out_channels
        self.stages = nn.ModuleList(layers)
        self.requires_grad_(False)

    def forward(self, images: Tensor) -> Tensor:
        """``[N, 3, S, S]`` in [0, 1] -> ``[N, len(statistics) * sum(channels)]``."""
        x = images * 2 - 1
        stats = []
        for conv in self.stages:
            x = F.relu(conv(x))
            for statistic in self.statistics:
                if statistic == "mean":
                    stats.append(x.mean(dim=(2, 3)))
                elif statistic == "std":
                    stats.append(x.flatten(2).std(dim=2, unbiased=False))
                else:
                    stats.append(x.amax(dim=(2, 3)))
        return torch.cat(stats, dim=1)


class ArtifactClassifier(nn.Module):
    """Resize -> frozen features -> standardize -> MLP head -> logit that the image is clean."""

    def __init__(self, config: ArtifactConfig):
        super().__init__()
        self.config = config
        self.features = RandomConvFeatures(config.channels, config.seed, config.statistics)
        self.register_buffer("feature_mean", torch.zeros(config.feature_dim))
        self.register_buffer("feature_std", torch.ones(config.feature_dim))
        if config.hidden > 0:
            self.head: nn.Module = nn.Sequential(
                nn.Linear(config.feature_dim, config.hidden), nn.ReLU(), nn.Linear(config.hidden, 1)
            )
        else:
            self.head = nn.Linear(config.feature_dim, 1)

    def embed(self, images: Tensor) -> Tensor:
        """Raw (unstandardized) frozen features of ``[N, 3, H, W]`` images in [0, 1]."""
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(
                images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
        return self.features(images)

    def logits_from_features(self, features: Tensor) -> Tensor:
        return self.head((features - self.feature_mean) / self.feature_std).squeeze(-1)

    def forward(self, images: Tensor) -> Tensor:
        """``[N, 3, H, W]`` in [0, 1] -> ``[N]`` logits (positive: clean)."""
        return self.logits_from_features(self.embed(images))


def save_classifier(classifier: ArtifactClassifier, path: str | Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in classifier.state_dict().items()}
    config = asdict(classifier.config)
    save_file(state, str(path), metadata={"format": FORMAT, "config": json.dumps(config)})


def load_classifier(path: str | Path) -> ArtifactClassifier:
    """Read a classifier written by :func:`save_classifier` (``.safetensors`` with a JSON config)."""
    from safetensors.torch import load_file

    file = require_path(
        path, "weights_path", "an artifact classifier (.safetensors)", TRAIN_HINT, kind="file"
    )
    raw = read_config_metadata(path, file, FORMAT, "an artifact classifier", TRAIN_HINT)
    raw["channels"] = tuple(raw["channels"])
    if "statistics" in raw:
        raw["statistics"] = tuple(raw["statistics"])
    config = ArtifactConfig(**raw)
    classifier = ArtifactClassifier(config)
    classifier.load_state_dict(load_file(str(file)))
    return classifier.eval().requires_grad_(False)


class ArtifactReward(Reward):
    """Probability that the image is clean under a trained artifact classifier (see the module docstring)."""

    name = "artifact"
    differentiable = True

    def __init__(self, weights_path: str | Path | None = None, **kwargs: Any):
        """``weights_path``: a classifier file written by :func:`save_classifier`, or a :data:`PRESETS` name."""
        super().__init__(**kwargs)
        if weights_path is None:
            raise RewardWeightsError(
                "artifact: no weights_path given. Pass the .safetensors file of a trained classifier, or a preset: "
                f"{', '.join(repr(k) for k in PRESETS)} (weights_path='shapes' is the shapes world's shipped "
                f"classifier, for 32x32 shapes-world images). {TRAIN_HINT}"
            )
        if isinstance(weights_path, str) and weights_path in PRESETS:
            weights_path = PRESETS[weights_path]
        self.classifier = load_classifier(weights_path).to(device=self.device, dtype=self.dtype)

    def modules(self) -> list[nn.Module]:
        return [self.classifier]

    def score_batch(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        frames, n_frames = flatten_frames(images)
        logits = self.classifier(frames.to(self.dtype)).float()
        scores = torch.sigmoid(logits).view(len(prompts), n_frames).mean(dim=1)
        return RewardOutput(
            scores, details={"logit": logits.detach().view(len(prompts), n_frames).mean(dim=1)}
        )


# ------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainReport:
    """Outcome of :func:`train_artifact_classifier`."""

    n_clean: int
    n_artifact: int
    train_accuracy: float
    val_accuracy: float | None
    final_loss: float


def _load_folder(folder: str | Path, argument: str, image_size: int) -> Tensor:
    path = require_path(folder, argument, "a folder of images", kind="dir")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{argument}={str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    from PIL import Image

    images = []
    for file in files:
        with Image.open(file) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float().unsqueeze(0) / 255
        images.append(
            F.interpolate(
                tensor, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
            )
            .clamp(0, 1)
            .squeeze(0)
        )
    return torch.stack(images)


def train_artifact_classifier(
    clean: str | Path | Tensor,
    artifact: str | Path | Tensor,
    out: str | Path | None = None,
    config: ArtifactConfig | None = None,
    epochs: int = 300,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    val_fraction: float = 0.2,
) -> tuple[ArtifactClassifier, TrainReport]:
    """Train the head on frozen features of clean (label 1) and artifact (label 0) images.

    ``clean``/``artifact`` are folders (searched recursively) or ``[N, 3, H, W]`` tensors in [0, 1]. A seeded
    ``val_fraction`` of each class is held out for the reported validation accuracy. Writes ``out`` when given.
    """
    config = config or ArtifactConfig()
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    clean_images = clean if isinstance(clean, Tensor) else _load_folder(clean, "--clean", config.image_size)
    artifact_images = (
        artifact if isinstance(artifact, Tensor) else _load_folder(artifact, "--artifact", config.image_size)
    )
    classifier = ArtifactClassifier(config)
    with torch.no_grad():
        features = torch.cat([classifier.embed(clean_images), classifier.embed(artifact_images)])
    labels = torch.cat([torch.ones(len(clean_images)), torch.zeros(len(artifact_images))])
    train_idx, val_idx = [], []
    for cls in (1.0, 0.0):
        idx = torch.nonzero(labels == cls).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_val = int(len(idx) * val_fraction) if len(idx) > 1 else 0
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    train, val = torch.cat(train_idx), torch.cat(val_idx)
    classifier.feature_mean.copy_(features[train].mean(dim=0))
    classifier.feature_std.copy_(features[train].std(dim=0, unbiased=False).clamp_min(1e-6))
    optimizer = torch.optim.Adam(classifier.head.parameters(), lr=lr, weight_decay=weight_decay)
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(
            classifier.logits_from_features(features[train]), labels[train]
        )
        loss.backward()
        optimizer.step()
    classifier.eval().requires_grad_(False)
    with torch.no_grad():
        predictions = (classifier.logits_from_features(features) > 0).float()
    accuracy = (predictions == labels).float()
    report = TrainReport(
        n_clean=len(clean_images),
        n_artifact=len(artifact_images),
        train_accuracy=float(accuracy[train].mean()),
        val_accuracy=float(accuracy[val].mean()) if len(val) else None,
        final_loss=float(loss.detach()),
    )
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        save_classifier(classifier, out)
    return classifier, report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rewards.artifact", description="artifact classifier tools"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the classifier from folders of clean and artifact images")
    train.add_argument("--clean", required=True, help="folder of clean images (label 1)")
    train.add_argument("--artifact", required=True, help="folder of images with artifacts (label 0)")
    train.add_argument("--out", required=True, help="output .safetensors file")
    train.add_argument("--image-size", type=int, default=ArtifactConfig.image_size)
    train.add_argument("--hidden", type=int, default=ArtifactConfig.hidden, help="hidden units (0: logistic)")
    train.add_argument(
        "--statistics",
        nargs="+",
        choices=STATISTICS,
        default=list(ArtifactConfig.statistics),
        help="per-channel spatial statistics of each feature stage",
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--epochs", type=int, default=300)
    train.add_argument("--lr", type=float, default=1e-2)
    train.add_argument("--val-fraction", type=float, default=0.2)
    args = parser.parse_args(argv)
    if not str(args.out).endswith(".safetensors"):
        parser.error(f"--out must end with .safetensors, got {args.out!r}")
    config = ArtifactConfig(
        image_size=args.image_size, hidden=args.hidden, seed=args.seed, statistics=tuple(args.statistics)
    )
    _, report = train_artifact_classifier(
        args.clean,
        args.artifact,
        args.out,
        config,
        epochs=args.epochs,
        lr=args.lr,
        val_fraction=args.val_fraction,
    )
    val = "n/a" if report.val_accuracy is None else f"{report.val_accuracy:.3f}"
    print(
        f"trained on {report.n_clean} clean + {report.n_artifact} artifact images: "
        f"train accuracy {report.train_accuracy:.3f}, validation accuracy {val}, loss {report.final_loss:.4f}"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The configs shipped under ``configs/`` that the tests load, and stand-ins for their placeholders."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "accelerate")
CONFIG_IDS = [str(p.relative_to(ROOT / "configs")) for p in CONFIGS]

# Placeholders that the config check itself resolves (files that must exist), as overrides that stand in for
# the user's files; a config loads only with them, as it does only with the user's.
PLACEHOLDER_FILES: dict[str, list[str]] = {
    "dmd/sdxl_1step.yaml": ["dmd.gan_real=assets/shapes/real/train.jsonl"],  # 32x32 captioned images
}

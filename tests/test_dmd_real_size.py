"""``benchmarks/perf/dmd_real_size.py`` (run on a GPU machine) prepares the shipped real-size configs here:
a config whose ``dmd.gan_real`` is a placeholder gets random images of its resolution, and then loads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from PIL import Image

from flowalign.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("dmd_real_size", ROOT / "benchmarks/perf/dmd_real_size.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_one_step_sdxl_config_gets_random_real_images_of_its_resolution(tmp_path):
    script = _script()
    config = ROOT / script.CONFIGS["sdxl_1step"]
    (override,) = script.stand_in_overrides(config, tmp_path, images=2)
    real = Path(override.removeprefix("dmd.gan_real="))
    lines = [json.loads(line) for line in real.read_text().splitlines()]
    assert len(lines) == 2 and all(Image.open(real.parent / x["image"]).size == (1024, 1024) for x in lines)
    assert load_config(config, [override]).dmd.gan_real == str(real)
    assert script.stand_in_overrides(ROOT / script.CONFIGS["sdxl"], tmp_path) == []

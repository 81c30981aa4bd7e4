"""benchmarks/shapes/grow_student.py: a larger shapes UNet that computes exactly the shipped model's function."""

from __future__ import annotations

import pytest
import torch
from scripts import load_script

from flowalign.models import load_model
from flowalign.models.shapes import SHIPPED_MODEL, ShapesPipeline


def _module():
    return load_script("benchmarks/shapes/grow_student.py")


@pytest.fixture(scope="module")
def unet():
    return ShapesPipeline.from_pretrained(SHIPPED_MODEL).unet


@pytest.mark.parametrize("depth, top", [(4, False), (2, True)])
def test_the_grown_unet_computes_the_shipped_function(unet, depth, top):
    grow = _module()
    bigger = grow.grown(unet, depth, top_attention=top)
    attentions = [m for name, m in bigger.named_modules() if name.endswith("attentions.0")]
    assert all(len(m.transformer_blocks) == depth for m in attentions)
    outputs = sum(1 for n, _ in bigger.named_modules() if n.endswith(".proj_out"))
    assert outputs == (10 if top else 7)  # the top level's attentions: one down, two up
    assert grow.parameters(bigger) > grow.parameters(unet)
    assert grow.largest_difference(unet, bigger) == 0.0
    # The equality is not vacuous: the new layers are live once their zero projections move.
    with torch.no_grad():
        bigger.get_parameter("down_blocks.1.attentions.0.transformer_blocks.1.ff.net.2.weight").add_(1e-2)
    assert grow.largest_difference(unet, bigger) > 1e-4


def test_a_grown_pipeline_saves_loads_and_samples_like_the_shipped_one(tmp_path):
    grow = _module()
    grow.main(["--depth", "2", "--out", str(tmp_path / "grown")])
    grown, shipped = load_model(str(tmp_path / "grown")), load_model("shapes")
    assert grown.family == "shapes"
    images = [
        m.pipeline(
            ["a photo of two red circles"], num_inference_steps=2, generator=torch.Generator().manual_seed(0)
        )
        for m in (grown, shipped)
    ]
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="--depth 0"):
        grow.grown(shipped.pipeline.unet, 0)

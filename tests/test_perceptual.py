"""The perceptual distance of DMD's regression term (``flowalign.algorithms.perceptual``)."""

from __future__ import annotations

import pytest
import torch

from flowalign.algorithms.perceptual import VGGLPIPS, ShapesLPIPS, load_perceptual, lpips_form
from flowalign.worlds.shapes.scene import Scene, SceneObject, render_scene


def test_lpips_form_is_zhang_et_als_equation_on_hand_built_features():
    # one position, two channels: (3, 4) / 5 - (0, 1) = (0.6, -0.2) -> 0.36 + 0.04; a second layer of two
    # positions adds the mean over space of (1, 0) - (0, 1) -> 2 and 0 (equal features)
    a1, b1 = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1), torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
    a2 = torch.tensor([[1.0, 2.0], [0.0, 5.0]]).view(1, 2, 1, 2)  # positions (1, 0) and (2, 5)
    b2 = torch.tensor([[0.0, 4.0], [1.0, 10.0]]).view(1, 2, 1, 2)  # positions (0, 1) and (4, 10)
    assert lpips_form([a1], [b1]).item() == pytest.approx(0.4, abs=1e-6)
    assert lpips_form([a1, a2], [b1, b2]).item() == pytest.approx(0.4 + 1.0, abs=1e-6)


def test_an_all_zero_position_has_a_finite_gradient():
    a = torch.zeros(1, 3, 2, 2, requires_grad=True)
    lpips_form([a], [torch.ones(1, 3, 2, 2)]).sum().backward()
    assert torch.isfinite(a.grad).all()


def _scene(*objects):
    return render_scene(Scene(objects=tuple(SceneObject(*o) for o in objects)))[None]


def test_shapes_lpips_weighs_a_missing_or_reshaped_object_above_noise_of_the_same_pixel_error():
    """What a careful viewer says of a two-object scene: losing an object, or one turning from a square into a
    triangle, is a larger change than faint noise over the image with the same mean squared error. (A recoloured
    object is not: the distance puts blue -> green below such noise, 0.46 against 1.27; documented in
    benchmarks/results/shapes_dmd_1step_lpips_regression.)"""
    distance = ShapesLPIPS()
    scene = _scene(("circle", "red", 11, 2, 4), ("square", "blue", 11, 18, 18))
    assert distance(scene, scene).item() == 0.0
    generator = torch.Generator().manual_seed(0)
    for other in (
        _scene(("circle", "red", 11, 2, 4)),
        _scene(("circle", "red", 11, 2, 4), ("triangle", "blue", 11, 18, 18)),
    ):
        noise = torch.randn(scene.shape, generator=generator)
        noisy = scene + noise * ((scene - other).pow(2).mean() / noise.pow(2).mean()).sqrt()
        assert (scene - noisy).pow(2).mean().item() == pytest.approx((scene - other).pow(2).mean().item())
        assert distance(scene, other).item() > 1.2 * distance(scene, noisy).item()
        assert distance(scene, other).item() == pytest.approx(distance(other, scene).item(), rel=1e-6)


def test_an_unknown_distance_names_the_option():
    with pytest.raises(ValueError, match="--loss: unknown perceptual distance 'vgg'"):
        load_perceptual("vgg", "--loss")


def test_lpips_form_is_the_lpips_packages_baseline_on_vgg_features():
    """The reference: the ``lpips`` package's LPIPS without its linear layers (``lpips=False``) over a (random)
    VGG16 is :func:`lpips_form` of that network's five feature maps."""
    import lpips

    torch.manual_seed(0)
    net = lpips.LPIPS(net="vgg", lpips=False, pnet_rand=True, verbose=False)
    x, y = torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32)
    features = [net.net(net.scaling_layer(2 * images - 1)) for images in (x, y)]
    torch.testing.assert_close(
        lpips_form(list(features[0]), list(features[1])), net(x, y, normalize=True).view(-1)
    )


def test_dmds_vgg_lpips_takes_images_in_0_1_and_needs_its_weights_offline(tmp_path, monkeypatch):
    distance = VGGLPIPS(pretrained_backbone=False)
    x = torch.rand(2, 3, 32, 32)
    assert distance(x, x).abs().max().item() < 1e-6
    assert (distance(x, torch.rand(2, 3, 32, 32)) > 0).all()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        FileNotFoundError, match="dmd.regression_loss=lpips: the VGG16 weights are not at .*set dmd"
    ):
        load_perceptual("lpips")

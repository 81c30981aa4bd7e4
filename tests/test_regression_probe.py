"""benchmarks/shapes/regression_probe.py: the pure-regression one-step student (issue 16's capacity probe)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file
from scripts import load_script

from flowalign.models import load_model


def _module():
    return load_script("benchmarks/shapes/regression_probe.py")


def test_an_epochs_batches_are_disjoint_and_the_schedule_warms_up_then_decays():
    probe = _module()
    batches = [probe.batch_indices(step, 20, 6, seed=0) for step in range(3)]  # one epoch: 3 batches of 6
    seen = torch.cat(batches)
    assert len(seen) == 18 and len(set(seen.tolist())) == 18
    assert not torch.equal(probe.batch_indices(3, 20, 6, seed=0), batches[0])  # the next epoch reshuffles
    # each epoch is its own seeded permutation (seed * 7919 + epoch), sliced batch by batch
    for seed, epoch in ((0, 0), (0, 1), (2, 1)):
        order = torch.randperm(20, generator=torch.Generator().manual_seed(seed * 7_919 + epoch))
        assert torch.equal(probe.batch_indices(3 * epoch + 1, 20, 6, seed=seed), order[6:12])
    assert torch.equal(probe.batch_indices(1, 20, 6, seed=0), batches[1])  # the same draw again (resume)

    class Args:
        lr, steps = 1e-4, 1100

    assert probe.learning_rate(0, Args) == 1e-6 and probe.learning_rate(99, Args) == 1e-4
    assert abs(probe.learning_rate(100, Args) - 1e-4) < 1e-15
    assert abs(probe.learning_rate(600, Args) - 0.55e-4) < 1e-15  # half way down the cosine
    assert abs(probe.learning_rate(1100, Args) - 1e-5) < 1e-15
    # the training pairs' noise seeds are the DMD recipe's pool formula (train.seed * 1_000_003 + 7_919 i + 1)
    assert probe.pair_seeds("train", 3, 2) == [
        2 * 1_000_003 + 1,
        2 * 1_000_003 + 7_920,
        2 * 1_000_003 + 15_839,
    ]


def test_a_resumed_probe_ends_with_the_uninterrupted_ones_weights(tmp_path, monkeypatch):
    """Interrupted after its step-2 checkpoint and rerun, the probe ends bitwise where an uninterrupted run
    does; its checkpoint is a ``--weights`` file of the shapes model; the losses are logged at every
    evaluation and the pairs are cached."""
    probe = _module()
    first, second = tmp_path / "a", tmp_path / "b"
    argv = ["regression_probe.py", "--pairs", "16", "--heldout", "8", "--teacher-steps", "2", "--steps", "4",
            "--batch", "8", "--eval-every", "2", "--checkpoint-every", "2"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(first)])
    probe.main()
    shutil.copytree(first, second)
    shutil.rmtree(second / "step-000004")  # interrupted after the step-2 checkpoint
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(second)])
    probe.main()
    ended = [load_file(str(d / "step-000004" / "trainable.safetensors")) for d in (first, second)]
    assert ended[0].keys() == ended[1].keys() and all(torch.equal(ended[0][k], ended[1][k]) for k in ended[0])
    rows = (second / "losses.jsonl").read_text().splitlines()
    assert len(rows) == 3 and '"step": 4' in rows[-1]
    assert (first / "pairs_train.safetensors").is_file() and (first / "curves.png").is_file()
    model = load_model("shapes")
    model.load_weights(first / "step-000004")
    shipped = load_model("shapes").denoiser.state_dict()
    assert any(not torch.equal(v, shipped[k]) for k, v in model.denoiser.state_dict().items())


def test_online_draws_cover_every_prompt_once_per_pass_and_never_repeat_a_noise():
    probe = _module()
    prompts = [f"p{i}" for i in range(5)]
    draws = [probe.online_draw(prompts, step, 3, seed=1) for step in range(5)]  # 15 pairs: three passes of 5
    texts = [t for d in draws for t in d[0]]
    seeds = [s for d in draws for s in d[1]]
    for turn in range(3):
        assert sorted(texts[5 * turn : 5 * turn + 5]) == prompts
    assert texts[:5] != texts[5:10]  # every pass is shuffled anew
    assert len(set(seeds)) == 15 and seeds[0] == 1_000_003 + 900_000_001
    assert probe.online_draw(prompts, 3, 3, seed=1) == draws[3]  # a resumed run draws the same pairs
    assert probe.online_draw(prompts, 3, 3, seed=2)[1] != draws[3][1]


def _shifted_weights(path, shift: float = 0.01):
    """A weight file of the shipped shapes denoiser with every floating tensor moved by ``shift``."""
    from safetensors.torch import save_file

    state = load_model("shapes").denoiser.state_dict()
    save_file(
        {k: (v + shift if v.is_floating_point() else v).contiguous() for k, v in state.items()}, str(path)
    )
    return path


def test_online_pairs_come_from_the_source_and_are_not_cached(tmp_path, monkeypatch):
    """``--online --source W``: the held-out pairs are ``W``'s samples at ``--teacher-steps`` (not the
    teacher's), named in their cache; no training set is cached and the losses have no training-pair column."""
    probe = _module()
    source = _shifted_weights(tmp_path / "source.safetensors")
    out = tmp_path / "online"
    monkeypatch.setattr(sys, "argv", [
        "regression_probe.py", "--online", "--source", str(source), "--teacher-steps", "2",
        "--teacher-guidance", "1.0", "--heldout", "4", "--steps", "2", "--batch", "4", "--eval-every", "1",
        "--out", str(out),
    ])  # fmt: skip
    probe.main()
    assert not (out / "pairs_train.safetensors").exists() and (out / "step-000002").is_dir()
    cached = load_file(str(out / "pairs_heldout_test.safetensors"))
    meta = json.loads((out / "pairs_heldout_test.json").read_text())
    assert meta["source"] == str(source) and meta["steps"] == 2
    sampler = load_model("shapes")
    sampler.load_weights(source)
    again = probe.teacher_pairs(sampler, meta["prompts"], meta["seeds"], 2, 1.0, None)
    teacher = probe.teacher_pairs(load_model("shapes"), meta["prompts"], meta["seeds"], 2, 1.0, None)
    assert torch.equal(again[0], cached["noise"]) and torch.equal(again[1], cached["targets"])
    assert not torch.allclose(teacher[1], cached["targets"])
    rows = [json.loads(r) for r in (out / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and all(
        "train" not in r and "heldout_test" in r for r in rows
    )


def test_pair_accuracy_of_the_pairs_own_sampler_is_exactly_the_targets(tmp_path, monkeypatch):
    """On pairs of the teacher at one step, CFG-free, the teacher as a one-step student reproduces the targets:
    the same accuracy, a paired difference of exactly 0 and MSE 0; a shifted network does not (MSE > 0)."""
    from safetensors.torch import save_file

    probe = _module()
    pairs = tmp_path / "pairs"
    monkeypatch.setattr(sys, "argv", [
        "regression_probe.py", "--pairs", "8", "--heldout", "8", "--teacher-steps", "1", "--teacher-guidance",
        "1.0", "--steps", "0", "--batch", "8", "--out", str(pairs),
    ])  # fmt: skip
    probe.main()
    teacher = tmp_path / "teacher.safetensors"
    save_file(
        {k: v.contiguous() for k, v in load_model("shapes").denoiser.state_dict().items()}, str(teacher)
    )
    shifted = _shifted_weights(tmp_path / "shifted.safetensors", 0.05)
    accuracy = load_script("benchmarks/shapes/pair_accuracy.py")
    out = tmp_path / "judged"
    monkeypatch.setattr(sys, "argv", [
        "pair_accuracy.py", "--pairs", str(pairs), "--count", "8", "--students", f"same={teacher}",
        f"shifted={shifted}", "--out", str(out),
    ])  # fmt: skip
    accuracy.main()
    results = json.loads((out / "results.json").read_text())
    assert list(results["sets"]) == ["train", "heldout_train", "heldout_test"]
    assert results["source"] == "the teacher, 1 steps, guidance 1.0"
    for rows in results["sets"].values():
        assert rows["same"]["overall"] == rows["targets"]["overall"] and rows["same"]["mse"] == 0.0
        assert rows["same"]["minus_targets"]["estimate"] == 0.0 and rows["same"]["shapes_lpips"] == 0.0
        assert rows["shifted"]["mse"] > 1e-4 and rows["shifted"]["shapes_lpips"] > 1e-4
    assert "| same (1 step) |" in (out / "results.md").read_text()


def test_a_perceptual_probe_logs_its_distance_and_refuses_to_resume_with_another_loss(tmp_path, monkeypatch):
    """``--loss shapes_lpips``: the held-out sets are logged in MSE and in the trained distance, which at step 0
    is ShapesLPIPS of the teacher's one-step samples against its 2-step targets; the same ``--out`` with
    ``--loss mse`` is one error instead of a run that mixes two losses."""
    from flowalign.algorithms.perceptual import ShapesLPIPS

    probe = _module()
    out = tmp_path / "lpips"
    argv = ["regression_probe.py", "--pairs", "4", "--heldout", "4", "--teacher-steps", "2", "--teacher-guidance",
            "1.0", "--steps", "1", "--batch", "4", "--eval-every", "1", "--out", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", [*argv, "--loss", "shapes_lpips"])
    probe.main()
    first = json.loads((out / "losses.jsonl").read_text().splitlines()[0])
    cached = load_file(str(out / "pairs_heldout_test.safetensors"))
    prompts = json.loads((out / "pairs_heldout_test.json").read_text())["prompts"]
    model = load_model("shapes")
    x = probe.student_samples(model, prompts, cached["noise"])
    expected = ShapesLPIPS()(probe.pixels(model, x), probe.pixels(model, cached["targets"])).mean().item()
    assert first["heldout_test_shapes_lpips"] == pytest.approx(expected, rel=1e-5) and expected > 0
    assert first["heldout_test"] == pytest.approx(torch.nn.functional.mse_loss(x, cached["targets"]).item())
    monkeypatch.setattr(sys, "argv", [*argv, "--loss", "mse"])
    with pytest.raises(SystemExit, match="holds a probe run with other settings"):
        probe.main()


def test_reflow_at_the_top_level_is_the_regression_and_below_it_the_straight_lines_velocity():
    """``reflow_loss`` at ``s = 1`` is the one-step regression's MSE on the same pairs (``x_1 = z``, sample
    ``z - v``); at any ``s`` it is the MSE of the network's velocity at ``(1 - s) x + s z`` against ``z - x``."""
    probe = _module()
    model = load_model("shapes")
    prompts = ["a red circle", "two blue squares"]
    noise = torch.randn(2, *model.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    targets = torch.randn(noise.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        top = probe.reflow_loss(model, prompts, noise, targets, torch.ones(2))
        one_step = probe.regression_loss(model, probe.student_sample(model, prompts, noise), targets)
        assert top.item() == pytest.approx(one_step.item(), rel=1e-5)
        s = torch.tensor([0.25, 0.6])
        x_s = (1 - s.view(2, 1, 1, 1)) * targets + s.view(2, 1, 1, 1) * noise
        v = model.predict(x_s, 1000 * s, model.encode(prompts, cfg=False))
        expected = ((v - (noise - targets)) ** 2).mean()
        assert probe.reflow_loss(model, prompts, noise, targets, s).item() == pytest.approx(expected.item())
    assert torch.equal(probe.reflow_sigmas(3, 4, 0), probe.reflow_sigmas(3, 4, 0))  # seeded by the step
    assert not torch.equal(probe.reflow_sigmas(3, 4, 0), probe.reflow_sigmas(4, 4, 0))


def test_a_reflow_run_starts_from_init_resumes_exactly_and_refuses_a_perceptual_loss(tmp_path, monkeypatch):
    """``--objective reflow --init W``: step 0's losses are ``W``'s one-step fit of the pairs, a run interrupted
    after its step-2 checkpoint ends bitwise where an uninterrupted one does, and ``--loss`` other than MSE is one
    error naming it."""
    probe = _module()
    init = _shifted_weights(tmp_path / "init.safetensors", 0.02)
    first, second = tmp_path / "a", tmp_path / "b"
    argv = ["regression_probe.py", "--objective", "reflow", "--init", str(init), "--pairs", "8", "--heldout", "4",
            "--teacher-steps", "2", "--teacher-guidance", "1.0", "--steps", "4", "--batch", "4", "--eval-every",
            "2", "--checkpoint-every", "2"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(first)])
    probe.main()
    start = json.loads((first / "losses.jsonl").read_text().splitlines()[0])
    cached = load_file(str(first / "pairs_heldout_test.safetensors"))
    prompts = json.loads((first / "pairs_heldout_test.json").read_text())["prompts"]
    student = load_model("shapes")
    student.load_weights(init)
    x = probe.student_samples(student, prompts, cached["noise"])
    assert start["heldout_test"] == pytest.approx(torch.nn.functional.mse_loss(x, cached["targets"]).item())
    shutil.copytree(first, second)
    shutil.rmtree(second / "step-000004")
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(second)])
    probe.main()
    ended = [load_file(str(d / "step-000004" / "trainable.safetensors")) for d in (first, second)]
    assert all(torch.equal(ended[0][k], ended[1][k]) for k in ended[0])
    monkeypatch.setattr(sys, "argv", [*argv, "--loss", "shapes_lpips", "--out", str(tmp_path / "c")])
    with pytest.raises(SystemExit, match="--loss shapes_lpips: --objective reflow"):
        probe.main()

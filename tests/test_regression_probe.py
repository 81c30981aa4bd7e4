"""benchmarks/shapes/regression_probe.py: the pure-regression one-step student (issue 16's capacity probe)."""

from __future__ import annotations

import shutil
import sys

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

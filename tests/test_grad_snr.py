"""benchmarks/shapes/grad_snr.py: the agreement statistics, and one end-to-end run on tiny components."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


def _module():
    return load_script("benchmarks/shapes/grad_snr.py")


def test_agreement_recovers_the_signal_to_noise_ratio():
    agreement = _module().agreement
    same = agreement(torch.ones(3, 5, dtype=torch.float64))
    assert same["cosine"] == pytest.approx(1.0) and same["iteration_snr"] > 1e6
    assert agreement(torch.eye(4))["cosine"] == pytest.approx(0.0, abs=1e-12)
    # g_k = mu + noise with |mu|^2 = P and tr(Sigma) = P: cosine ~ 1/2, SNR ~ 1.
    gen = torch.Generator().manual_seed(0)
    p = 200_000
    g = torch.ones(6, p, dtype=torch.float64) + torch.randn(6, p, generator=gen, dtype=torch.float64)
    stats = agreement(g)
    assert stats["cosine"] == pytest.approx(0.5, abs=0.01)
    assert stats["iteration_snr"] == pytest.approx(1.0, abs=0.05)
    with pytest.raises(ValueError, match="K >= 2"):
        agreement(torch.ones(1, 3))


def test_grad_snr_runs_a_recipe_without_updating(tmp_path, monkeypatch, capsys):
    out = tmp_path / "report.json"
    argv = ["grad_snr.py", str(ROOT / "configs/grpo/tiny_sd3.yaml"), "--iterations", "3", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    module = _module()
    steps = []
    original = torch.optim.AdamW.step
    monkeypatch.setattr(
        torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1) or original(self, *a, **k)
    )
    module.main()
    report = json.loads(out.read_text())
    assert steps == [], "the script must never update the parameters"
    assert report["iterations"] + len(report["dropped_iterations"]) == 3
    assert -1 <= report["cosine"] <= 1 and report["samples_per_iteration"] > 0
    assert "cosine:" in capsys.readouterr().out

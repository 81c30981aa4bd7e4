"""How well can one call of the shapes UNet fit the teacher's ODE map? A pure-regression one-step student.

The one-step DMD students of issue 16 stay 0.16-0.26 below the teacher on test, whatever the recipe, and a
student with twice the parameters did no better. This probe asks the question under DMD: is the map the student
must learn, from the initial noise ``z`` to the teacher's 20-step ODE sample ``x(z, prompt)``, within reach of
one call of this network at all? It is the knowledge-distillation baseline of Luhman & Luhman (2021, "Knowledge
Distillation in Iterative Generative Models for Improved Sampling Speed"): regress the student's one-step sample
on the teacher's sample from the same noise, over many pairs, and nothing else (no distribution matching, no
GAN). DMD's regression term (``dmd.regression_weight``) is this loss on a pool of 1024 pairs.

1. ``--pairs`` training pairs: the training prompts in a seeded shuffle, cycled (the recipe's order), one seeded
   noise each, the teacher's ODE sample at ``--teacher-steps`` steps and guidance ``--teacher-guidance`` (the
   recipe's ``dmd.teacher_steps`` / ``dmd.real_guidance``). Held-out pairs, never trained on: ``--heldout`` on
   the training prompts with other noise, and as many on the test prompts. All are cached under ``--out``.
2. A full copy of the teacher trained as the one-step student (the top level, CFG-free: the DMD students'
   sampler), mean squared error in latent space (the regression term's loss), AdamW with ``--lr`` after a
   100-step linear warmup, cosine-decayed to a tenth over ``--steps`` (a probe of what fits, so the schedule
   that fits best), gradient clipping at 10, ``--batch`` pairs per step drawn without replacement per epoch.
3. Every ``--eval-every`` steps: the loss on 1024 of the training pairs, on the held-out pairs of the training
   prompts and on those of the test prompts (``curves.png``, ``losses.jsonl``). The gap between the first two
   is what did not generalise over noise; the level of the first is what the network could not fit.
4. ``--measure NAME=WEIGHTS``: the same held-out losses of other students (the DMD students' regression fit).

``--loss shapes_lpips`` trains on a perceptual distance instead of the MSE, as DMD regresses with LPIPS: LPIPS's
form over the shapes world's perception network (``flowalign.algorithms.perceptual``; the held-out sets are then
logged in both, and ``curves.png`` gains a panel for the distance).

``--source WEIGHTS`` takes the pairs from another sampler of the same model instead of the teacher: a distilled
student's checkpoint, sampled at ``--teacher-steps`` and ``--teacher-guidance`` (the 4-step DMD student at 4 steps,
CFG-free: a tenth of the teacher's 40 calls per pair, at its accuracy). ``--online`` draws ``--batch`` fresh pairs
every step from that sampler instead of a cached training set (the training prompts in seeded shuffles, cycled;
noises never repeated), so the student never sees a noise twice and cannot fit the pairs without fitting the map;
its held-out sets are the source's too.

``--objective reflow`` trains the same pairs as a flow instead (rectified flow's reflow, Liu et al. 2023, "Flow
Straight and Fast", Sec. 2.3; InstaFlow's first stage, Liu et al. 2024, Sec. 3): ``|| v(x_s, s) - (z - x) ||^2`` at
``x_s = (1 - s) x + s z``, ``s ~ U(0, 1)`` (their uniform time), over the pairs ``(z, x)``. At ``s = 1`` that is the
regression's loss (``x_1 = z`` and the one-step sample is ``z - v``); below it the network learns a flow whose
paths are the straight lines between the teacher's noises and samples, the "2-rectified flow", whose few-step
samples InstaFlow then distils into one step: ``--source`` its checkpoint and ``--init`` it (the student's
starting weights; default the teacher). The logged losses stay the one-step regression's.

Checkpoints (``step-N/trainable.safetensors``, loaded by ``--weights`` and by ``distill_compare.py``) are
written every ``--checkpoint-every`` steps and at the end; a rerun with the same ``--out`` resumes from the last
one exactly (its optimizer state and the step's seeded draw).

    python benchmarks/shapes/regression_probe.py --pairs 16384 --steps 6000 --out runs/ev/regression_probe
    python benchmarks/shapes/distill_compare.py --students regression=runs/ev/regression_probe/step-006000 \\
        --baseline regression --student-steps 1 --out benchmarks/results/shapes_dmd_1step_regression_probe
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from flowalign.algorithms.perceptual import PERCEPTUAL_DISTANCES, load_perceptual  # noqa: E402
from flowalign.data.prompts import load_prompt_set  # noqa: E402
from flowalign.models import load_model  # noqa: E402
from flowalign.samplers.generate import generate, seeded_generators  # noqa: E402
from flowalign.samplers.paths import FlowPath  # noqa: E402
from flowalign.samplers.plan import SamplingPlan  # noqa: E402

PROMPTS = ROOT / "assets" / "shapes" / "prompts"
# Seeds of the three pair sets: disjoint from each other (train: the DMD recipe's own formula at train.seed 0).
SEED_BASE = {"train": 1, "heldout_train": 500_000_001, "heldout_test": 700_000_001, "online": 900_000_001}


def pair_seeds(kind: str, n: int, seed: int) -> list[int]:
    """The noise seeds of ``n`` pairs of one set (train: the DMD recipe's ``train.seed * 1_000_003 + 7_919 i +
    1``, so ``--pairs 1024`` is the recipe's own pool)."""
    return [seed * 1_000_003 + 7_919 * i + SEED_BASE[kind] for i in range(n)]


def cycled_prompts(path: Path, n: int, seed: int) -> list[str]:
    """``n`` prompts of a prompt file in a seeded shuffle, cycled (the DMD recipe's order of its pool)."""
    records = load_prompt_set(path)
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed))
    return [records[int(order[i % len(records)])].prompt for i in range(n)]


def online_draw(prompts: list[str], step: int, batch: int, seed: int) -> tuple[list[str], list[int]]:
    """The prompts and noise seeds of ``step``'s fresh pairs (``--online``): pair ``i = step * batch + k`` takes
    the prompt at ``i mod P`` of pass ``i // P``'s seeded shuffle of the ``P`` prompts and the noise seed
    ``seed * 1_000_003 + i + 900_000_001``, so every prompt comes once per pass, no noise comes twice, and a
    resumed run draws the same pairs."""
    texts, seeds, orders = [], [], {}
    for i in range(step * batch, (step + 1) * batch):
        turn, k = divmod(i, len(prompts))
        if turn not in orders:  # one shuffle per pass
            orders[turn] = torch.randperm(
                len(prompts), generator=torch.Generator().manual_seed(seed * 7_919 + turn)
            )
        texts.append(prompts[int(orders[turn][k])])
        seeds.append(seed * 1_000_003 + i + SEED_BASE["online"])
    return texts, seeds


@torch.no_grad()
def teacher_pairs(model, prompts: list[str], seeds: list[int], steps: int, guidance: float, desc: str | None):
    """``(noise, teacher samples)`` latents of one seeded noise per prompt, in chunks of 64 (a progress bar
    named ``desc``, none without)."""
    noise, targets = [], []
    side = model.default_resolution
    for start in tqdm(range(0, len(prompts), 64), desc=desc, disable=desc is None):
        part = slice(start, start + 64)
        cond = model.encode(prompts[part], cfg=guidance > 1)
        z = model.initial_noise(len(cond), side, side, seeded_generators(seeds[part], model.device))
        out = generate(model, None, z, cond=cond, steps=steps, guidance=guidance, decode=False)
        noise.append(z)
        targets.append(out.final)
    return torch.cat(noise), torch.cat(targets)


def cached_pairs(model, out: Path, name: str, prompts: list[str], seeds: list[int], args) -> dict:
    """A pair set from ``out/pairs_<name>.safetensors``, generated and saved the first time."""
    file = out / f"pairs_{name}.safetensors"
    expected = {
        "prompts": prompts,
        "seeds": seeds,
        "steps": args.teacher_steps,
        "guidance": args.teacher_guidance,
    }
    if args.source:  # (caches of the teacher's pairs have no source key)
        expected["source"] = str(args.source)
    if file.is_file():
        saved = load_file(str(file))
        if json.loads((out / f"pairs_{name}.json").read_text()) != expected:
            sys.exit(
                f"{file}: cached with other prompts, seeds, source or teacher settings; use another --out"
            )
        return {"prompts": prompts, "noise": saved["noise"], "targets": saved["targets"]}
    noise, targets = teacher_pairs(
        model, prompts, seeds, args.teacher_steps, args.teacher_guidance, f"pairs {name}"
    )
    save_file({"noise": noise.contiguous(), "targets": targets.contiguous()}, str(file))
    (out / f"pairs_{name}.json").write_text(json.dumps(expected))
    return {"prompts": prompts, "noise": noise, "targets": targets}


def reflow_sigmas(step: int, batch: int, seed: int) -> torch.Tensor:
    """``step``'s ``[batch]`` levels ``s ~ U(0, 1)`` for ``--objective reflow``, seeded by the step (a resumed run
    draws the same)."""
    return torch.rand(batch, generator=torch.Generator().manual_seed(seed * 7_919 + step + 300_000_001))


def reflow_loss(model, prompts: list[str], noise: torch.Tensor, targets: torch.Tensor, sigmas: torch.Tensor):
    """Rectified flow's loss on a coupling (Liu et al. 2023, Eq. 1 with ``(X_0, X_1)`` the pairs; flowalign's
    flow form, ``x_s = (1 - s) x + s z`` and velocity ``z - x``): ``mean || v(x_s, 1000 s) - (z - x) ||^2``,
    CFG-free (the pairs' guidance is distilled into the flow)."""
    path = FlowPath()
    sigmas = sigmas.to(noise.device)
    x_s = path.noised(targets.float(), sigmas, noise.float())
    velocity = model.predict(x_s, path.timestep(sigmas), model.encode(prompts, cfg=False), 1.0)
    return F.mse_loss(velocity, path.target(targets.float(), noise.float(), sigmas))


ONE_STEP = SamplingPlan(sde=(False,), grad=(True,), checkpoint=(False,))


def student_sample(model, prompts: list[str], noise: torch.Tensor) -> torch.Tensor:
    """The one-step student's sample (top level, CFG-free), with gradient where grad is enabled."""
    cond = model.encode(prompts, cfg=False)
    return generate(model, None, noise, cond=cond, steps=1, guidance=1.0, plan=ONE_STEP, decode=False).final


@torch.no_grad()
def student_samples(model, prompts: list[str], noise: torch.Tensor) -> torch.Tensor:
    """The one-step student's samples of many pairs, in chunks of 128, without gradient (float32)."""
    parts = [
        student_sample(model, prompts[start : start + 128], noise[start : start + 128]).float()
        for start in range(0, len(prompts), 128)
    ]
    return torch.cat(parts)


def pixels(model, latents: torch.Tensor) -> torch.Tensor:
    """The shapes model's latents as images in about [0, 1], not clamped (a perceptual loss keeps its gradient
    where a student overshoots)."""
    return F.pixel_shuffle(latents.float(), model.pipeline.patch_size) / 2 + 0.5


def regression_loss(model, x: torch.Tensor, targets: torch.Tensor, distance=None) -> torch.Tensor:
    """The regression's loss: latent MSE, or the mean ``distance`` (``--loss shapes_lpips``) of the images."""
    if distance is None:
        return F.mse_loss(x.float(), targets.float())
    return distance(pixels(model, x), pixels(model, targets)).mean()


@torch.no_grad()
def pair_loss(model, pairs: dict, count: int | None = None, distance=None) -> float:
    """Mean squared error (or ``distance``) of the student on (the first ``count`` of) a pair set."""
    n = len(pairs["prompts"]) if count is None else count
    x = student_samples(model, pairs["prompts"][:n], pairs["noise"][:n])
    return regression_loss(model, x, pairs["targets"][:n], distance).item()


def learning_rate(step: int, args) -> float:
    """Linear warmup over 100 steps, then a cosine from ``--lr`` to a tenth of it at ``--steps``."""
    if step < 100:
        return args.lr * (step + 1) / 100
    progress = (step - 100) / max(1, args.steps - 100)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_indices(step: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """The pairs of ``step``: its slice of its epoch's seeded permutation (so a resume draws the same)."""
    per_epoch = n // batch
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7_919 + epoch))
    return order[k * batch : (k + 1) * batch]


def save_checkpoint(model, optimizer, out: Path, step: int) -> None:
    folder = out / f"step-{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.denoiser.state_dict().items()},
        str(folder / "trainable.safetensors"),
    )
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    (folder / "probe_step.json").write_text(json.dumps({"step": step}))


def plot_curves(
    out: Path, rows: list[dict], measured: dict, pairs_of: str = "the teacher", objective: str = "regression"
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [k[len("heldout_train_") :] for k in rows[0] if k.startswith("heldout_train_")]  # --loss
    fig, axes = plt.subplots(1, 1 + len(trained), figsize=(6.4 * (1 + len(trained)), 4.0), squeeze=False)
    ax = axes[0, 0]
    steps = [r["step"] for r in rows]
    for key, label in [
        ("train", "1024 training pairs"),
        ("heldout_train", "held-out noise, training prompts"),
        ("heldout_test", "held-out noise, test prompts"),
    ]:
        if key not in rows[0]:  # --online: no cached training pairs
            continue
        ax.plot(steps, [r[key] for r in rows], label=label)
    for i, (name, losses) in enumerate(measured.items()):
        ax.axhline(
            losses["heldout_train"], ls="--", color=f"C{i + 3}", label=f"{name} (held-out, training prompts)"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("MSE to the pairs' targets (latents)")
    if all(r[key] > 0 for r in rows for key in ("heldout_train", "heldout_test")):
        ax.set_yscale("log")  # (a student that is its pairs' own sampler has loss 0)
    ax.legend(fontsize=7)
    trained_by = f" ({trained[0]})" if trained else ""
    trained_as = "pure regression" if objective == "regression" else "reflow (its one-step sample)"
    ax.set_title(f"one-step student, {trained_as}{trained_by} on pairs of\n{pairs_of}", fontsize=9)
    # the trained distance on the held-out sets, one panel each
    for other, distance in zip(axes[0, 1:], trained, strict=True):
        for key, label, color in [
            ("heldout_train", "held-out noise, training prompts", "C1"),
            ("heldout_test", "held-out noise, test prompts", "C2"),
        ]:
            other.plot(steps, [r[f"{key}_{distance}"] for r in rows], label=label, color=color)
        other.set_xlabel("step")
        other.set_ylabel(f"{distance} to the pairs' targets")
        other.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes", help="the teacher (a grown copy: grow_student.py)")
    parser.add_argument("--pairs", type=int, default=16384)
    parser.add_argument("--heldout", type=int, default=1024, help="held-out pairs per set")
    parser.add_argument("--teacher-steps", type=int, default=20)
    parser.add_argument("--teacher-guidance", type=float, default=1.5)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--checkpoint-every", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--measure", nargs="*", default=[], metavar="NAME=WEIGHTS", help="students to measure too"
    )
    parser.add_argument("--measure-model", default="shapes", help="the model --measure's weights belong to")
    parser.add_argument(
        "--source", type=Path, default=None, metavar="WEIGHTS",
        help="take the pairs from this checkpoint of --model (a distilled student) at --teacher-steps and "
        "--teacher-guidance instead of from the teacher",
    )  # fmt: skip
    parser.add_argument(
        "--online", action="store_true", help="fresh pairs every step instead of --pairs cached ones"
    )
    parser.add_argument(
        "--loss", choices=("mse", *PERCEPTUAL_DISTANCES), default="mse",
        help="the regression's loss: latent MSE, or LPIPS's form over the shapes world's perception network "
        "(DMD's LPIPS; flowalign.algorithms.perceptual)",
    )  # fmt: skip
    parser.add_argument(
        "--objective", choices=("regression", "reflow"), default="regression",
        help="regress the one-step sample on the pairs, or train the pairs' straight flow (reflow, see above)",
    )  # fmt: skip
    parser.add_argument(
        "--init", type=Path, default=None, metavar="WEIGHTS",
        help="the student's starting weights, a checkpoint of --model (default: --model's own)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if any("=" not in spec for spec in args.measure):
        sys.exit(f"--measure takes NAME=WEIGHTS pairs, got {args.measure}")
    if args.pairs < args.batch and not args.online:
        sys.exit(f"--pairs {args.pairs} must be at least --batch {args.batch}")
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {key: str(getattr(args, key)) for key in ("loss", "lr", "batch", "source", "online", "seed")}
    if args.objective != "regression" or args.init:  # (runs of the plain probe keep their settings file)
        settings |= {"objective": args.objective, "init": str(args.init)}
    if args.objective == "reflow" and args.loss != "mse":
        sys.exit(f"--loss {args.loss}: --objective reflow trains the flow's velocity in MSE; drop --loss")
    written = args.out / "probe_settings.json"
    if written.is_file() and json.loads(written.read_text()) != settings:  # a resume must train the same way
        sys.exit(
            f"{args.out} holds a probe run with other settings ({written.read_text()}); use another --out"
        )
    written.write_text(json.dumps(settings))
    torch.manual_seed(args.seed)
    model = load_model(args.model)
    if args.init:
        model.load_weights(args.init)
    source = load_model(args.model)  # the pairs' sampler, frozen: the teacher, or --source's weights on it
    if args.source:
        source.load_weights(args.source)
    pairs = {
        "heldout_train": cached_pairs(
            source, args.out, "heldout_train", cycled_prompts(PROMPTS / "train.jsonl", args.heldout, args.seed + 1),
            pair_seeds("heldout_train", args.heldout, args.seed), args,
        ),
        "heldout_test": cached_pairs(
            source, args.out, "heldout_test", cycled_prompts(PROMPTS / "test.jsonl", args.heldout, args.seed),
            pair_seeds("heldout_test", args.heldout, args.seed), args,
        ),
    }  # fmt: skip
    if not args.online:
        pairs["train"] = cached_pairs(
            source, args.out, "train", cycled_prompts(PROMPTS / "train.jsonl", args.pairs, args.seed),
            pair_seeds("train", args.pairs, args.seed), args,
        )  # fmt: skip
    fit_count = min(1024, args.pairs)
    train_prompts = [r.prompt for r in load_prompt_set(PROMPTS / "train.jsonl")]

    distance = None if args.loss == "mse" else load_perceptual(args.loss, "--loss")

    def losses() -> dict[str, float]:
        fit = {} if args.online else {"train": pair_loss(model, pairs["train"], fit_count)}
        held = {key: pair_loss(model, pairs[key]) for key in ("heldout_train", "heldout_test")}
        if distance is not None:  # the trained loss too (the MSE keys stay comparable across losses)
            held |= {f"{key}_{args.loss}": pair_loss(model, pairs[key], None, distance) for key in list(held)}
        return fit | held

    def training_pairs(step: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """``step``'s prompts, noises and targets: a fresh draw (``--online``) or a batch of the cached set."""
        if args.online:
            texts, seeds = online_draw(train_prompts, step, args.batch, args.seed)
            noise, targets = teacher_pairs(
                source, texts, seeds, args.teacher_steps, args.teacher_guidance, None
            )
            return texts, noise, targets
        index = batch_indices(step, args.pairs, args.batch, args.seed)
        train = pairs["train"]
        return [train["prompts"][i] for i in index], train["noise"][index], train["targets"][index]

    saved = args.out / "measured.json"
    measured = json.loads(saved.read_text()) if saved.is_file() else {}  # earlier calls' --measure too
    for spec in args.measure:
        name, weights = spec.split("=", 1)
        other = load_model(args.measure_model)
        other.load_weights(weights)
        measured[name] = {
            key: pair_loss(other, pairs[key], fit_count if key == "train" else None) for key in pairs
        }
        print(f"{name}: {json.dumps(measured[name])}", flush=True)
    if measured:
        saved.write_text(json.dumps(measured, indent=1))

    model.denoiser.requires_grad_(True)
    params = [p for p in model.denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=0.01)
    start = 0
    done = sorted(args.out.glob("step-*/probe_step.json"))
    log = args.out / "losses.jsonl"
    if done:  # resume from the last checkpoint
        last = done[-1].parent
        model.load_weights(last)
        optimizer.load_state_dict(torch.load(last / "optimizer.pt", weights_only=True))
        start = json.loads(done[-1].read_text())["step"]
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        rows = [r for r in rows if r["step"] <= start]
        print(f"resumed at step {start} from {last}", flush=True)
    else:
        rows = [{"step": 0, **losses(), "seconds": 0.0}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    clock = time.perf_counter()
    elapsed = rows[-1]["seconds"]
    for step in tqdm(range(start, args.steps), desc="regression probe", initial=start, total=args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        texts, noise, targets = training_pairs(step)
        if args.objective == "reflow":
            loss = reflow_loss(model, texts, noise, targets, reflow_sigmas(step, len(texts), args.seed))
        else:
            loss = regression_loss(model, student_sample(model, texts, noise), targets, distance)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
        done_steps = step + 1
        if done_steps % args.eval_every == 0 or done_steps == args.steps:
            seconds = elapsed + time.perf_counter() - clock
            rows.append({"step": done_steps, **losses(), "batch_loss": loss.item(), "seconds": seconds})
            with log.open("a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
        if done_steps % args.checkpoint_every == 0 or done_steps == args.steps:
            save_checkpoint(model, optimizer, args.out, done_steps)
    plot_curves(
        args.out,
        rows,
        measured,
        f"{args.source} ({args.teacher_steps} steps)" if args.source else "the teacher",
        args.objective,
    )
    print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()

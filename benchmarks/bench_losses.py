"""How much of a training step the losses cost, next to the networks.

Each loss is timed forward + backward at the paper recipe's full size (batch 8, 512x512 crop,
65x65 logit maps): CWD on the logits (8x19x65x65) and on the PSP feature (8x512x65x65), pixel KD,
the segmentation CE with its upsampling to 512x512, the discriminator step with the gradient
penalty and the generator's adversarial term.

The networks at that size take tens of seconds per step on a 2-core CPU, so they are *measured*
at batch 1 and a smaller crop and *scaled* to batch 8 at 512x512 by the ratio of their conv/linear
multiply-accumulates (MACs, counted with forward hooks). Small inputs run at lower throughput than
large ones, so the scaled network time is, if anything, an overestimate and the loss fractions an
underestimate on CPU; on a GPU pass ``--batch 8 --net-crop 512 512`` to measure directly.

    python benchmarks/bench_losses.py            # CPU, about a minute
    python benchmarks/bench_losses.py --quick    # smaller network crop, fewer repeats
    python benchmarks/bench_losses.py --device cuda --net-crop 512 512 --net-batch 8
    python benchmarks/bench_losses.py --new-terms  # the post-CWD terms only, as ratios to CWD
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import stats
import torch
from torch import nn

from cwdseg.distill import (
    CriterionCWD,
    CriterionDSN,
    CriterionKD,
    discriminator_wgan_gp_loss,
    generator_adversarial_loss,
)
from cwdseg.distill.afdcd import CriterionAfDCD
from cwdseg.distill.at import CriterionAT
from cwdseg.distill.bpkd import CriterionBPKD
from cwdseg.distill.cirkd import CriterionCIRKDMemory, CriterionCIRKDMiniBatch
from cwdseg.distill.dist import CriterionDIST
from cwdseg.distill.fitnet import CriterionFitNet
from cwdseg.distill.ifvd import CriterionIFV
from cwdseg.distill.local import CriterionLocal
from cwdseg.distill.lskd import CriterionLSKD
from cwdseg.distill.mgd import CriterionMGD
from cwdseg.distill.pairwise import CriterionPairWise
from cwdseg.models import build_model
from cwdseg.models.connector import FeatureConnector
from cwdseg.models.discriminator import Discriminator
from cwdseg.models.summary import arch_macs

ROOT = Path(__file__).resolve().parents[1]

NUM_CLASSES = 19


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def logit_map_size(crop: tuple[int, int]) -> tuple[int, int]:
    """Spatial size of the student's logits for a crop (512 -> 65), from a shape-only forward."""
    with torch.device("meta"):
        shadow = build_model("resnet18", NUM_CLASSES).eval()
        logits = shadow(torch.zeros(1, 3, *crop))[0]
    return int(logits.shape[2]), int(logits.shape[3])


class Case:
    """One timed piece of work: ``fn`` is run as is; ``scale`` converts its time to the recipe size."""

    def __init__(self, name: str, what: str, fn: Callable[[], object], scale: float = 1.0,
                 measured_at: str = "full size") -> None:
        self.name, self.what, self.fn, self.scale, self.measured_at = name, what, fn, scale, measured_at
        self.times: list[float] = []


def _loss_cases(device: torch.device, batch: int, crop: tuple[int, int]) -> list[Case]:
    """Forward + backward of each loss at the recipe size."""
    g = torch.Generator(device="cpu").manual_seed(0)
    h, wmap = logit_map_size(crop)

    def randn(*shape: int, scale: float = 3.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device)

    s_logits = randn(batch, NUM_CLASSES, h, wmap).requires_grad_(True)
    s_aux = randn(batch, NUM_CLASSES, h, wmap).requires_grad_(True)
    t_logits = randn(batch, NUM_CLASSES, h, wmap)
    s_feat = randn(batch, 128, h, wmap).requires_grad_(True)
    t_feat = randn(batch, 512, h, wmap).relu()
    labels = torch.randint(0, NUM_CLASSES, (batch, *crop), generator=g).to(device)
    connector = FeatureConnector(128, 512).to(device).train()
    disc = Discriminator(NUM_CLASSES).to(device).train()

    cwd, kd, dsn = CriterionCWD("channel", "kl", 4.0), CriterionKD(1.0), CriterionDSN()
    shape = f"{batch}x{NUM_CLASSES}x{h}x{wmap}"
    return [
        Case("CWD logits", f"channel KL tau=4 on {shape}", lambda: cwd(s_logits, t_logits).backward()),
        Case("CWD feature", f"connector 128->512 + channel KL on {batch}x512x{h}x{wmap}",
             lambda: cwd(connector(s_feat), t_feat).backward()),
        Case("KD", f"pixel KL T=1 on {shape}", lambda: kd(s_logits, t_logits).backward()),
        Case("CE (DSN)", f"main+aux CE, upsampled to {batch}x{NUM_CLASSES}x{crop[0]}x{crop[1]}",
             lambda: dsn((s_logits, s_aux), labels).backward()),
        Case("GAN generator", f"-mean D(S), backward through D, {shape}",
             lambda: generator_adversarial_loss(disc(s_logits)).backward()),
        Case("GAN D step", "D(S), D(T), gradient penalty, backward (double backward)",
             lambda: discriminator_wgan_gp_loss(disc, s_logits, t_logits, 10.0, lambda_d=0.1)[0].backward()),
    ] + _comparison_cases(s_logits, t_logits, s_feat, t_feat, labels, connector, shape)


# The terms of the Table 2 comparison (tools/run_grid.py): not part of the "all losses" row.
COMPARISON = {"AT logits", "AT feature", "LOCAL logits", "LOCAL feature", "PA logits", "PA feature",
              "IFVD logits", "IFVD feature", "FitNet", "DIST", "PI feature"}


def _comparison_cases(s_logits, t_logits, s_feat, t_feat, labels, connector, shape) -> list[Case]:
    """Forward + backward of each comparison term at the recipe's shapes (presets' settings)."""
    fshape = f"{s_feat.shape[0]}x128->512x{s_feat.shape[2]}x{s_feat.shape[3]}"
    at, local, pa = CriterionAT(), CriterionLocal(), CriterionPairWise(0.5)
    ifv, dist, fit, kd = CriterionIFV(NUM_CLASSES), CriterionDIST(), CriterionFitNet(), CriterionKD(1.0)
    regressor = nn.Conv2d(128, 512, 1, bias=False).to(s_feat.device)
    return [
        Case("AT logits", f"attention of {shape}", lambda: at(s_logits, t_logits).backward()),
        Case("AT feature", f"connector + attention of {fshape}", lambda: at(connector(s_feat), t_feat).backward()),
        Case("LOCAL logits", f"8-neighbour distances of {shape}", lambda: local(s_logits, t_logits).backward()),
        Case("LOCAL feature", f"8-neighbour distances of {fshape}", lambda: local(s_feat, t_feat).backward()),
        Case("PA logits", f"pool 0.5 (3x3 nodes), affinities of {shape}", lambda: pa(s_logits, t_logits).backward()),
        Case("PA feature", f"pool 0.5, affinities of {fshape}", lambda: pa(s_feat, t_feat).backward()),
        Case("IFVD logits", f"19 class prototypes, cosines of {shape}",
             lambda: ifv(s_logits, t_logits, labels).backward()),
        Case("IFVD feature", f"19 class prototypes, cosines of {fshape}",
             lambda: ifv(s_feat, t_feat, labels).backward()),
        Case("FitNet", f"1x1 conv regressor + MSE, {fshape}", lambda: fit(regressor(s_feat), t_feat).backward()),
        Case("DIST", f"inter/intra-class Pearson of {shape}", lambda: dist(s_logits, t_logits).backward()),
        Case("PI feature", f"connector + channel-softmax KL, {fshape}",
             lambda: kd(connector(s_feat), t_feat).backward()),
    ]


def _new_term_cases(device: torch.device, batch: int, crop: tuple[int, int]) -> list[Case]:
    """Forward + backward of CWD (the reference rows) and each post-CWD term at the recipe's shapes,
    with the presets' settings: logits 8x19x65x65, head features 128 (student) / 512 (teacher)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    h, w = logit_map_size(crop)

    def randn(*shape: int, scale: float = 3.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device)

    s_logits = randn(batch, NUM_CLASSES, h, w).requires_grad_(True)
    t_logits = randn(batch, NUM_CLASSES, h, w)
    s_feat = randn(batch, 128, h, w).requires_grad_(True)
    t_feat = randn(batch, 512, h, w).relu()
    labels = torch.randint(0, NUM_CLASSES, (batch, *crop), generator=g).to(device)
    labels[:, :crop[0] // 8] = 255                                         # some ignored pixels
    connector = FeatureConnector(128, 512).to(device).train()
    cwd = CriterionCWD("channel", "kl", 4.0)
    lskd, cirkd_kd, bpkd = CriterionLSKD(2.0), CriterionLSKD(1.0, standardize=False), CriterionBPKD(NUM_CLASSES)
    batch_rel = CriterionCIRKDMiniBatch(0.1)
    memory = CriterionCIRKDMemory(128, 512, NUM_CLASSES, rng=torch.Generator().manual_seed(0)).to(device).train()
    mgd = CriterionMGD(128, 512, rng=torch.Generator().manual_seed(0)).to(device).train()
    afdcd = CriterionAfDCD(128, 512, rng=torch.Generator().manual_seed(0)).to(device).train()
    shape, fshape = f"{batch}x{NUM_CLASSES}x{h}x{w}", f"{batch}x128->512x{h}x{w}"
    return [
        Case("CWD logits", f"channel KL tau=4 on {shape}", lambda: cwd(s_logits, t_logits).backward()),
        Case("CWD feature", f"connector 128->512 + channel KL on {batch}x512x{h}x{w}",
             lambda: cwd(connector(s_feat), t_feat).backward()),
        Case("LS-KD", f"z-score + pixel KL T=2 on {shape}", lambda: lskd(s_logits, t_logits).backward()),
        Case("CIRKD pixel KD", f"pixel KL T=1 (class sum) on {shape}", lambda: cirkd_kd(s_logits, t_logits).backward()),
        Case("CIRKD mini-batch",
             f"B^2={batch * batch} PxP relations (P={h * w}), rows recomputed in backward, {fshape}",
             lambda: batch_rel(s_feat, t_feat).backward()),
        Case("CIRKD memory", f"projection head, enqueue, 216+54 per class x 19 contrast, {fshape}",
             lambda: memory(s_feat, t_feat, labels).backward()),
        Case("MGD", f"align 1x1 + mask + generator (2 3x3 convs 512) + SSE, {fshape}",
             lambda: mgd(s_feat, t_feat).backward()),
        Case("Af-DCD", f"as MGD + 16-group 4x4-patch contrast on 4x-pooled maps, {fshape}",
             lambda: afdcd(s_feat, t_feat).backward()),
        Case("BPKD", f"edge band from {batch}x{crop[0]}x{crop[1]} labels, edge KL + body CWD on {shape}",
             lambda: bpkd(s_logits, t_logits, labels).backward()),
    ]


def run_new_terms(device: str = "cpu", batch: int = 8, crop: tuple[int, int] = (512, 512), reps: int = 5) -> list[dict]:
    """Time CWD and the post-CWD terms interleaved; rows ``{name, what, spread (s), ratio_feature,
    ratio_logits}``: the median over the median of CWD on the feature / on the logits."""
    dev = torch.device(device)
    cases = _new_term_cases(dev, batch, crop)
    times = stats.interleaved({c.name: c.fn for c in cases}, reps, warmup=1, sync=lambda: _sync(dev))
    summaries = {c.name: stats.summarize(times[c.name]) for c in cases}
    feat, logit = summaries["CWD feature"].median, summaries["CWD logits"].median
    return [{"name": c.name, "what": c.what, "spread": summaries[c.name].as_dict(), "device": device,
             "ratio_feature": summaries[c.name].median / feat, "ratio_logits": summaries[c.name].median / logit}
            for c in cases]


def format_new_terms(rows: list[dict]) -> str:
    """The rows as a Markdown table (ms, IQR, min-max, ratios to CWD)."""
    lines = ["| term | what | ms, median | IQR | min–max | / CWD feature | / CWD logits |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = {k: v * 1e3 for k, v in r["spread"].items() if k != "n"}
        lines.append(f"| {r['name']} | {r['what']} | {sp['median']:.1f} | {sp['q1']:.1f}–{sp['q3']:.1f} | "
                     f"{sp['min']:.1f}–{sp['max']:.1f} | {r['ratio_feature']:.3f} | {r['ratio_logits']:.1f} |")
    return "\n".join(lines)


def _network_cases(device: torch.device, batch: int, crop: tuple[int, int], net_batch: int,
                   net_crop: tuple[int, int]) -> list[Case]:
    """Student forward+backward and teacher forward at (net_batch, net_crop), scaled by MACs."""
    cases = []
    for arch, role in (("resnet18", "student fwd+bwd"), ("resnet101", "teacher fwd")):
        # models.summary counts on the meta device: free even at 512x512 (dsn head included, as measured)
        macs_small = arch_macs(arch, *net_crop) * net_batch
        macs_full = arch_macs(arch, *crop) * batch
        torch.manual_seed(0)
        model = build_model(arch, NUM_CLASSES).to(device)
        x = torch.randn(net_batch, 3, *net_crop, device=device)
        if role.startswith("student"):
            model.train()

            def step(model: nn.Module = model, x: torch.Tensor = x) -> None:
                model.zero_grad(set_to_none=True)
                out = model(x)
                (out[0].float().mean() + out[1].float().mean() + out[2].float().mean()).backward()
        else:
            model.eval()

            def step(model: nn.Module = model, x: torch.Tensor = x) -> None:
                with torch.no_grad():
                    model(x)
        scale = macs_full / macs_small
        cases.append(Case(
            f"{role} ({arch})",
            (f"measured at batch {net_batch} {net_crop[0]}x{net_crop[1]} ({macs_small / 1e9:.1f} GMAC fwd), "
             f"scaled x{scale:.1f} by MACs to batch {batch} {crop[0]}x{crop[1]} ({macs_full / 1e9:.0f} GMAC fwd)"),
            step, scale=scale, measured_at=f"batch {net_batch} {net_crop[0]}x{net_crop[1]}",
        ))
    return cases


def run(quick: bool = False, device: str = "cpu", batch: int = 8, crop: tuple[int, int] = (512, 512),
        net_batch: int = 2, net_crop: tuple[int, int] | None = None, reps: int | None = None) -> list[dict]:
    """Time each loss (at the recipe size) and the networks (measured small, scaled by MACs).

    The cases run interleaved (one of each per repeat, alternating order; ``stats.interleaved``) after
    one warm-up call each, so that load from other processes falls on all of them alike; each time is
    the median over repeats, with its spread in ``spread`` (seconds at the recipe size). Returns one
    row per case, ``{name, what, seconds, spread, measured_seconds, measured_at, scaled, frac_student,
    frac_networks, device}`` (fractions of the student fwd+bwd, and of student fwd+bwd + teacher fwd,
    at the recipe size), then an ``all losses`` row (CE + CWD logits + KD + both GAN terms; the sum of
    medians, no spread of its own).
    """
    dev = torch.device(device)
    if net_crop is None:
        net_crop = (128, 128) if quick else (256, 256)
    if reps is None:
        reps = 2 if quick else 3
    cases = _loss_cases(dev, batch, crop) + _network_cases(dev, batch, crop, net_batch, tuple(net_crop))
    times = stats.interleaved({case.name: case.fn for case in cases}, reps, warmup=1, sync=lambda: _sync(dev))
    rows = []
    for case in cases:
        case.times = times[case.name]
        spread = stats.summarize(case.times)
        rows.append({"name": case.name, "what": case.what, "seconds": spread.median * case.scale,
                     "spread": spread.scaled(case.scale).as_dict(), "measured_seconds": spread.median,
                     "measured_at": case.measured_at, "scaled": case.scale != 1.0})
    student = rows[-2]["seconds"]
    networks = student + rows[-1]["seconds"]
    total = sum(r["seconds"] for r in rows[:-2] if r["name"] != "CWD feature" and r["name"] not in COMPARISON)
    rows.insert(len(rows) - 2, {"name": "all losses",
                                "what": "CE + CWD logits + KD + GAN (G and D): the heaviest recipe",
                                "seconds": total, "spread": None, "measured_seconds": total, "measured_at": "full size",
                                "scaled": False})
    for r in rows:
        r["frac_student"] = r["seconds"] / student
        r["frac_networks"] = r["seconds"] / networks
        r["device"] = device
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows as an aligned text table."""
    head = f"{'term':<34} {'ms':>10} {'IQR':>19} {'min-max':>19} {'/student':>9} {'/nets':>7}  what"
    lines = ["loss cost per training step (forward + backward), " + (rows[0]["device"] if rows else ""), head,
             "-" * len(head)]
    for r in rows:
        sp = r.get("spread")
        iqr = "" if sp is None else f"{sp['q1'] * 1e3:.1f}-{sp['q3'] * 1e3:.1f}"
        span = "" if sp is None else f"{sp['min'] * 1e3:.1f}-{sp['max'] * 1e3:.1f}"
        lines.append(f"{r['name']:<34} {r['seconds'] * 1e3:>10.1f} {iqr:>19} {span:>19} {r['frac_student']:>8.1%} "
                     f"{r['frac_networks']:>6.1%}  {r['what']}")
    lines.append("/student: fraction of the student forward+backward; /nets: of student fwd+bwd + teacher fwd. "
                 "Network rows marked 'scaled' were measured at the small size shown and scaled by MACs.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8, help="recipe batch for the losses and the scaled networks")
    p.add_argument("--crop", type=int, nargs=2, default=(512, 512), help="recipe crop")
    p.add_argument("--net-batch", type=int, default=2,
                   help="batch at which the networks are measured "
                        "(>= 2: BatchNorm of the 1x1 PSP bin needs it in train mode)")
    p.add_argument("--net-crop", type=int, nargs=2, default=None, help="crop at which the networks are measured")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--new-terms", action="store_true", help="time only CWD and the post-CWD terms (issue 22)")
    a = p.parse_args(argv)
    if a.quick:
        print(stats.QUICK_BANNER)
    if a.new_terms:
        rows = run_new_terms(a.device, a.batch, tuple(a.crop), a.reps or (2 if a.quick else 5))
        print(format_new_terms(rows))
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
        return
    rows = run(quick=a.quick, device=a.device, batch=a.batch, crop=tuple(a.crop), net_batch=a.net_batch,
               net_crop=tuple(a.net_crop) if a.net_crop else None, reps=a.reps)
    print(format_table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

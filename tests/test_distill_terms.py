"""Every distillation term added for the Table 2 comparison, against an independent computation of
its paper's formula written here with explicit loops (plain Python floats, not the modules' tensor code)."""
from __future__ import annotations

import math

import pytest
import torch

from cwdseg.cli.train_config import resolve_terms
from cwdseg.distill.at import CriterionAT
from cwdseg.distill.dist import CriterionDIST
from cwdseg.distill.fitnet import CriterionFitNet
from cwdseg.distill.ifvd import CriterionIFV
from cwdseg.distill.local import CriterionLocal
from cwdseg.distill.pairwise import CriterionPairWise
from cwdseg.distill.registry import METHODS, PRESETS, TABLE2, TERM_NAMES, DistillSpecError, build_term, parse_distill

N, H, W = 2, 7, 6
IGNORE = 255


def maps(cs: int, ct: int, seed: int = 0, h: int = H, w: int = W) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, cs, h, w, generator=g, dtype=torch.float64) * 2,
            torch.randn(N, ct, h, w, generator=g, dtype=torch.float64) * 2)


def labels_with_ignored(k: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (N, H, W), generator=g)
    y[0, :2] = IGNORE                 # ignored rows
    y[1, 3, 3] = IGNORE
    y[1][y[1] == 1] = 2               # class 1 absent from image 1
    return y


def vec(x: torch.Tensor, n: int, h: int, w: int) -> list[float]:
    return [float(v) for v in x[n, :, h, w]]


def norm(v: list[float]) -> float:
    return math.sqrt(sum(a * a for a in v))


# ------------------------------------------------------------------------------------------------
# Independent references from the papers' formulas
# ------------------------------------------------------------------------------------------------
def ref_at(s, t) -> float:
    total = 0.0
    for n in range(N):
        att = []
        for x in (s, t):
            q = [sum(float(x[n, c, h, w]) ** 2 for c in range(x.shape[1])) / x.shape[1]
                 for h in range(H) for w in range(W)]
            z = math.sqrt(sum(v * v for v in q))
            att.append([v / z for v in q])
        total += sum((a - b) ** 2 for a, b in zip(*att))
    return total / (N * H * W)


def ref_local(s, t) -> float:
    total, count = 0.0, 0
    for n in range(N):
        for h in range(1, H - 1):
            for w in range(1, W - 1):
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        if dy == dx == 0:
                            continue
                        d = [norm([a - b for a, b in zip(vec(x, n, h, w), vec(x, n, h + dy, w + dx))]) for x in (s, t)]
                        total += (d[0] - d[1]) ** 2
                        count += 1
    return total / count


def ref_pairwise(s, t, scale: float) -> float:
    kh, kw = int(H * scale), int(W * scale)
    total = 0.0
    for n in range(N):
        nodes = []
        for x in (s, t):
            pooled = []
            for h0 in range(0, H, kh):          # stride = kernel, ceil_mode: the last window is clipped
                for w0 in range(0, W, kw):
                    v = [max(float(x[n, c, h, w]) for h in range(h0, min(h0 + kh, H)) for w in range(w0, min(w0 + kw, W)))
                         for c in range(x.shape[1])]
                    z = norm(v) + 1e-8
                    pooled.append([a / z for a in v])
            nodes.append(pooled)
        m = len(nodes[0])
        for i in range(m):
            for j in range(m):
                a_s = sum(a * b for a, b in zip(nodes[0][i], nodes[0][j]))
                a_t = sum(a * b for a, b in zip(nodes[1][i], nodes[1][j]))
                total += (a_t - a_s) ** 2 / (m * m)
    return total / N


def ref_ifv(s, t, y, k: int) -> float:
    total = 0.0
    for n in range(N):
        cos = []
        for x in (s, t):
            protos = {}
            for cls in range(k):
                pix = [vec(x, n, h, w) for h in range(H) for w in range(W) if int(y[n, h, w]) == cls]
                if pix:
                    protos[cls] = [sum(col) / len(pix) for col in zip(*pix)]
            row = []
            for h in range(H):
                for w in range(W):
                    v, cls = vec(x, n, h, w), int(y[n, h, w])
                    if cls not in protos:
                        row.append(1.0)   # ignored: the pixel is its own centre
                        continue
                    p = protos[cls]
                    row.append(sum(a * b for a, b in zip(v, p)) / (norm(v) * norm(p)))
            cos.append(row)
        total += sum((a - b) ** 2 for a, b in zip(*cos))
    return total / (N * H * W)


def ref_fitnet(s, t) -> float:
    return sum((float(a) - float(b)) ** 2 for a, b in zip(s.flatten(), t.flatten())) / s.numel()


def ref_dist(s, t, beta: float, gamma: float, tau: float) -> float:
    k = s.shape[1]

    def probs(x):
        rows = []
        for n in range(N):
            for h in range(H):
                for w in range(W):
                    e = [math.exp(float(x[n, c, h, w]) / tau) for c in range(k)]
                    rows.append([v / sum(e) for v in e])
        return rows

    def pearson(a, b):
        ma, mb = sum(a) / len(a), sum(b) / len(b)
        a, b = [v - ma for v in a], [v - mb for v in b]
        return sum(x * y for x, y in zip(a, b)) / (norm(a) * norm(b))

    ps, pt = probs(s), probs(t)
    inter = 1 - sum(pearson(a, b) for a, b in zip(ps, pt)) / len(ps)
    intra = 1 - sum(pearson([r[c] for r in ps], [r[c] for r in pt]) for c in range(k)) / k
    return tau ** 2 * (beta * inter + gamma * intra)


# ------------------------------------------------------------------------------------------------
# Values
# ------------------------------------------------------------------------------------------------
def test_at_matches_formula():
    s, t = maps(3, 5)  # channels differ: attention is a channel mean
    assert CriterionAT()(s, t).item() == pytest.approx(ref_at(s, t), rel=1e-6)


@pytest.mark.parametrize("cs, ct", [(3, 3), (2, 4)])
def test_local_matches_formula(cs, ct):
    s, t = maps(cs, ct)
    assert CriterionLocal()(s, t).item() == pytest.approx(ref_local(s, t), rel=1e-6)


def test_local_normalize_is_scale_free():
    s, t = maps(3, 4)
    crit = CriterionLocal(normalize=True)
    assert crit(s * 7.0, t).item() == pytest.approx(crit(s, t).item(), rel=1e-6)
    assert CriterionLocal()(s * 7.0, t).item() != pytest.approx(CriterionLocal()(s, t).item(), rel=1e-3)


@pytest.mark.parametrize("scale", [0.5, 0.3, 1.0])
def test_pairwise_matches_formula(scale):
    s, t = maps(3, 5)
    assert CriterionPairWise(scale)(s, t).item() == pytest.approx(ref_pairwise(s, t, scale), rel=1e-6)


def test_pairwise_recipe_window_gives_nine_nodes():
    # 65x65 maps, scale 0.5: window 32, ceil_mode -> 3x3 nodes (SKD's setting)
    s, t = torch.randn(1, 2, 65, 65), torch.randn(1, 2, 65, 65)
    pooled = torch.nn.functional.max_pool2d(t, 32, 32, ceil_mode=True)
    assert pooled.shape[-2:] == (3, 3)
    assert torch.isfinite(CriterionPairWise(0.5)(s, t))


def test_ifv_matches_formula_with_ignored_pixels():
    s, t = maps(3, 5)
    y = labels_with_ignored(4)
    got = CriterionIFV(num_classes=4, ignore_index=IGNORE)(s, t, y).item()
    assert got == pytest.approx(ref_ifv(s, t, y, 4), rel=1e-5)


def test_ifv_resizes_labels_nearest():
    s, t = maps(3, 5)
    y = labels_with_ignored(4)
    big = y.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # nearest-downsampling gives y back
    crit = CriterionIFV(num_classes=4)
    assert crit(s, t, big).item() == pytest.approx(crit(s, t, y).item(), rel=1e-7)
    with pytest.raises(ValueError, match="needs the labels"):
        crit(s, t)


def test_fitnet_matches_formula_and_needs_equal_channels():
    s, t = maps(4, 4)
    assert CriterionFitNet()(s, t).item() == pytest.approx(ref_fitnet(s, t), rel=1e-6)
    with pytest.raises(ValueError, match="regressor"):
        CriterionFitNet()(*maps(3, 4))


@pytest.mark.parametrize("beta, gamma, tau", [(1.0, 1.0, 1.0), (2.0, 0.5, 2.0)])
def test_dist_matches_formula(beta, gamma, tau):
    s, t = maps(4, 4)
    got = CriterionDIST(beta, gamma, tau)(s, t).item()
    assert got == pytest.approx(ref_dist(s, t, beta, gamma, tau), rel=1e-6)
    assert CriterionDIST()(t, t).item() == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------------------------
# Common properties of every term: student-only gradient, bf16, resize
# ------------------------------------------------------------------------------------------------
TABLE2_METHODS = ("cwd", "kd", "at", "local", "pa", "ifvd", "fitnet", "dist")


def all_terms():
    """(name, loss module, student channels, teacher channels): every term of the paper's comparison but adv
    (the methods published after CWD have the same checks in test_new_terms.py)."""
    for name in TERM_NAMES:
        if TERM_NAMES[name][0] not in TABLE2_METHODS:
            continue
        _, opts = next(iter(parse_distill([f"{name}=1"]).items()))
        from cwdseg.distill.registry import complete

        module = build_term(name, complete(name, opts), num_classes=4, ignore_label=IGNORE)
        same = name.startswith(("fitnet", "dist", "kd", "cwd"))
        yield name, module, 4, (4 if same else 6)


@pytest.mark.parametrize("name, module, cs, ct", list(all_terms()), ids=lambda v: v if isinstance(v, str) else "")
def test_gradient_reaches_only_the_student(name, module, cs, ct):
    s, t = maps(cs, ct, seed=3)
    s, t = s.float().requires_grad_(True), t.float().requires_grad_(True)
    loss = module(s, t, labels_with_ignored(4))
    loss.backward()
    assert t.grad is None, f"{name}: gradient reached the teacher map"
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


@pytest.mark.parametrize("name, module, cs, ct", list(all_terms()), ids=lambda v: v if isinstance(v, str) else "")
def test_finite_under_bf16_autocast(name, module, cs, ct):
    s, t = maps(cs, ct, seed=4)
    s, t = (s * 20).bfloat16().requires_grad_(True), (t * 20).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module(s, t, labels_with_ignored(4))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad.float()).all()


@pytest.mark.parametrize("name, module, cs, ct", list(all_terms()), ids=lambda v: v if isinstance(v, str) else "")
def test_student_map_is_resized_to_the_teachers(name, module, cs, ct):
    s, t = maps(cs, ct, seed=5, h=H + 1, w=W + 1)
    small = s[:, :, :H, :W].contiguous()  # a map one pixel smaller, as two architectures can give
    y = torch.zeros(N, H + 1, W + 1, dtype=torch.long)
    up = torch.nn.functional.interpolate(small, size=(H + 1, W + 1), mode="bilinear", align_corners=True)
    assert module(small, t, y).item() == pytest.approx(module(up, t, y).item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------
# The spec
# ------------------------------------------------------------------------------------------------
def resolve_spec(typed: dict) -> dict:
    """The spec the typed flags give (no recipe file, no demo layer)."""
    return resolve_terms([], None, typed)[1]


def flags(**kw) -> dict:
    """Flags as typed on the command line (argparse dests; untyped flags are absent)."""
    return dict(kw)


def test_original_flags_become_spec_entries():
    spec = resolve_spec(flags(cwd=True, cwd_feat=True, kd=True, adv=True, lambda_cwd=35.0, temperature=2.0))
    assert list(spec) == ["cwd", "kd", "adv"]
    assert spec["cwd"] == {"weight": 35.0, "on": "feature", "tau": 2.0, "norm": "channel", "div": "kl",
                           "ignore_mask": False}
    assert spec["kd"]["weight"] == 10.0 and spec["adv"] == {"weight": 0.001, "on": "logits", "d": 0.1, "gp": 10.0}
    assert resolve_spec(flags()) == {}


def test_distill_entries_and_presets():
    spec = resolve_spec(flags(preset="cd_logits", distill=["cwd=5", "pa_feat=0.5,scale=0.25", "local=1,normalize=true"]))
    assert spec["cwd"]["weight"] == 5.0 and spec["cwd"]["tau"] == 4.0  # --distill re-weights the preset's term
    assert spec["pa_feat"] == {"weight": 0.5, "on": "feature", "scale": 0.25}
    assert spec["local"]["normalize"] is True and spec["local"]["on"] == "logits"
    assert resolve_spec(flags(distill=["at=1,on=feature"]))["at"]["on"] == "feature"


@pytest.mark.parametrize("kw, message", [
    (dict(distill=["nope=1"]), "unknown term 'nope'"),
    (dict(distill=["kd"]), "give a weight"),
    (dict(distill=["kd=lots"]), "is not a number"),
    (dict(distill=["kd=-2"]), ">= 0"),
    (dict(distill=["kd=1,tau=2"]), "unknown option 'tau=2' for kd"),
    (dict(distill=["cwd=1,div=js"]), "must be one of kl, mse"),
    (dict(distill=["dist=1,on=feature"]), "dist compares logits"),
    (dict(distill=["kd=1", "kd=2"]), "names 'kd' twice"),
    (dict(distill=["kd=1"], kd=True), "--kd True and --distill/--preset both set"),
    (dict(preset="no_such"), "--preset 'no_such' is unknown"),
])
def test_bad_specs_are_one_line_errors(kw, message):
    with pytest.raises(DistillSpecError, match=None) as exc:
        resolve_spec(flags(**kw))
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_presets_cover_table2_and_parse():
    assert {PRESETS[p].method for p in TABLE2} == {"Student", "AT", "PI", "LOCAL", "PA", "IFVD", "HO", "CD (ours)"}
    for name, preset in PRESETS.items():
        spec = resolve_spec(flags(preset=name))
        assert len(spec) == len(preset.terms)
    assert set(METHODS) >= {"cwd", "kd", "at", "local", "pa", "ifvd", "adv", "fitnet", "dist"}


# ------------------------------------------------------------------------------------------------
# train.py's flags
# ------------------------------------------------------------------------------------------------
def test_train_flags_resolve_the_spec_and_name_the_run():
    from cwdseg.cli.train import resolve_config

    a = resolve_config(["--preset", "at_feat"])
    assert a.output.name == "at_feat"
    assert a.distill.terms == {"at_feat": {"weight": 10000.0, "on": "feature", "p": 2.0}}
    a = resolve_config(["--distill", "at=100", "kd=1"])
    assert a.output.name == "at100_kd1" and list(a.distill.terms) == ["at", "kd"]
    a = resolve_config(["--cwd", "True", "--kd", "True"])  # the original flags: the original run name
    assert a.output.name == "True_False_False_channel_kl_3_4_train" and list(a.distill.terms) == ["cwd", "kd"]
    assert resolve_config([]).distill.terms == {}


@pytest.mark.parametrize("argv, message", [
    (["--distill", "nope=1"], "unknown term 'nope'"),
    (["--distill", "cwd=1", "--cwd", "True"], "--cwd True and --distill/--preset both set the term 'cwd'"),
    (["--preset", "nope"], "invalid choice: 'nope'"),
])
def test_train_rejects_bad_specs_with_one_line(argv, message, capsys):
    from cwdseg.cli.train import resolve_config

    with pytest.raises(SystemExit) as exc:
        resolve_config(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("teacher, expected", [
    ("resnet101", {"at_feat": 512, "kd_feat": 512, "fitnet": 512, "cwd": 512}),   # 128 -> 512 channels
    ("resnet18", {"fitnet": 128, "cwd": 128}),                                      # equal widths
])
def test_connectors_follow_each_terms_policy(teacher, expected):
    from cwdseg.engine.build import build_connectors
    from cwdseg.models.connector import FeatureConnector

    spec = resolve_spec(flags(cwd=True, cwd_feat=True, distill=["at_feat=1", "kd_feat=1", "fitnet=1", "pa_feat=1",
                                                                  "ifvd_feat=1", "local_feat=1", "at=1"]))
    from cwdseg.config import RunConfig, from_dict, to_dict

    data = to_dict(RunConfig())
    data["distill"]["terms"] = spec
    data["models"].update(teacher_arch={"resnet101": "pspnet_resnet101", "resnet18": "pspnet_resnet18"}[teacher])
    connectors = build_connectors(from_dict(data))
    got = {name: (m.out_channels if isinstance(m, (torch.nn.Conv2d, FeatureConnector)) else None)
           for name, m in connectors.items()}
    assert got == expected
    assert isinstance(connectors["fitnet"], torch.nn.Conv2d) and isinstance(connectors["cwd"], FeatureConnector)

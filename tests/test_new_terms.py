"""The post-CWD terms (issue 22) against loops written here from each paper's / reference's formula,
in float64, with ignored pixels, batch 2, odd sizes and different student/teacher widths; gradients,
bf16 autocast, the CIRKD memory bank's state and the registry entries."""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from cwdseg.distill.afdcd import CriterionAfDCD, omni_contrastive
from cwdseg.distill.bpkd import CriterionBPKD
from cwdseg.distill.cirkd import CriterionCIRKDMemory, CriterionCIRKDMiniBatch
from cwdseg.distill.lskd import CriterionLSKD
from cwdseg.distill.mgd import CriterionMGD
from cwdseg.distill.options import Option, OptionError, check_option
from cwdseg.distill.registry import METHODS, PRESETS, build_term, complete, parse_distill, preset_spec

N, H, W = 2, 5, 7          # odd sizes, batch > 1
K = 4                      # classes
CS, CT = 3, 8              # student / teacher widths
IGNORE = 255


def rand(*shape: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def labels(h: int = H, w: int = W, seed: int = 1, k: int = K) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (N, h, w), generator=g)
    y[0, :2] = IGNORE
    y[1, h // 2, w // 2] = IGNORE
    return y


def softmax(v: list[float]) -> list[float]:
    m = max(v)
    e = [math.exp(a - m) for a in v]
    z = sum(e)
    return [a / z for a in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)


def l2n(v: list[float]) -> list[float]:
    z = max(math.sqrt(sum(a * a for a in v)), 1e-12)
    return [a / z for a in v]


def pix(x: torch.Tensor, n: int, h: int, w: int) -> list[float]:
    return [float(a) for a in x[n, :, h, w]]


def conv_loop(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Zero-padded stride-1 convolution, 'same' size, by explicit loops over output positions and taps."""
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    out = torch.zeros(n, o, h, w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            for di in range(kh):
                for dj in range(kw):
                    y, z = i + di - kh // 2, j + dj - kw // 2
                    if 0 <= y < h and 0 <= z < w:
                        out[:, :, i, j] += x[:, :, y, z] @ weight[:, :, di, dj].t()
    if bias is not None:
        out += bias[None, :, None, None]
    return out


# ------------------------------------------------------------------------------------------------
# LS-KD and CIRKD's pixel KD
# ------------------------------------------------------------------------------------------------
def ref_lskd(s, t, T: float, standardize: bool, valid=None) -> float:
    total, count = 0.0, 0
    for n in range(N):
        for h in range(s.shape[2]):
            for w in range(s.shape[3]):
                if valid is not None and not valid[n, h, w]:
                    continue
                zs, zt = pix(s, n, h, w), pix(t, n, h, w)
                if standardize:
                    def z(v):
                        m = sum(v) / len(v)
                        sd = math.sqrt(sum((a - m) ** 2 for a in v) / (len(v) - 1))
                        return [(a - m) / (1e-7 + sd) for a in v]
                    zs, zt = z(zs), z(zt)
                total += kl(softmax([a / T for a in zt]), softmax([a / T for a in zs])) * T * T
                count += 1
    return total / max(count, 1)


@pytest.mark.parametrize("T, standardize", [(2.0, True), (1.0, False), (3.5, True)])
def test_lskd_matches_the_per_pixel_loop(T, standardize):
    s, t = rand(N, K, H, W, seed=1) * 3, rand(N, K, H, W, seed=2)
    y = labels()
    assert CriterionLSKD(T, standardize)(s, t).item() == pytest.approx(ref_lskd(s, t, T, standardize), rel=1e-10)
    masked = CriterionLSKD(T, standardize, ignore_mask=True, ignore_label=IGNORE)(s, t, y).item()
    assert masked == pytest.approx(ref_lskd(s, t, T, standardize, valid=y != IGNORE), rel=1e-10)
    # LS-KD is invariant to a per-pixel affine change of the student's logits (what standardisation buys)
    if standardize:
        shifted = CriterionLSKD(T, True)(s * 5 + 3, t).item()
        assert shifted == pytest.approx(CriterionLSKD(T, True)(s, t).item(), rel=1e-6)


def test_cirkd_pixel_kd_is_the_class_sum_of_the_toolkit_kd():
    from cwdseg.distill.kd import CriterionKD
    s, t = rand(N, K, H, W, seed=3), rand(N, K, H, W, seed=4)
    module = build_term("cirkd_kd", complete("cirkd_kd", {"weight": 1.0}), K, IGNORE)
    assert module(s, t).item() == pytest.approx(K * CriterionKD(1.0)(s, t).item(), rel=1e-6)  # KD: float32


# ------------------------------------------------------------------------------------------------
# MGD
# ------------------------------------------------------------------------------------------------
def keep_mask(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(N, 1, H, W, generator=g) > 0.6).double()


def regenerate_loop(module, s, mask) -> torch.Tensor:
    a = conv_loop(s, module.align.weight.detach(), module.align.bias.detach()) if CS != CT else s
    gen = module.generator if hasattr(module, "generator") else module.projector
    x = conv_loop(a * mask, gen[0].weight.detach(), gen[0].bias.detach()).clamp(min=0)
    return conv_loop(x, gen[2].weight.detach(), gen[2].bias.detach())


def test_mgd_matches_the_summed_squared_error_over_the_batch():
    torch.manual_seed(0)
    module = CriterionMGD(CS, CT, alpha=0.3).double()
    s, t, mask = rand(N, CS, H, W, seed=5), rand(N, CT, H, W, seed=6), keep_mask(7)
    new = regenerate_loop(module, s, mask)
    ref = 0.3 * sum(float(v) ** 2 for v in (new - t).flatten()) / N
    assert module(s, t, mask=mask).item() == pytest.approx(ref, rel=1e-10)
    # the same widths: no alignment layer (MGD's rule)
    assert isinstance(CriterionMGD(CT, CT).align, torch.nn.Identity)


def test_mgd_mask_drops_the_given_fraction_and_follows_its_generator():
    module = CriterionMGD(CS, CT, mask_ratio=0.75, rng=torch.Generator().manual_seed(3))
    x = torch.zeros(64, CT, 32, 32)
    from cwdseg.distill.mgd import random_keep_mask
    kept = random_keep_mask(x, 0.75, torch.Generator().manual_seed(3))
    assert kept.shape == (64, 1, 32, 32) and abs(kept.mean().item() - 0.25) < 0.01
    assert torch.equal(kept, random_keep_mask(x, 0.75, torch.Generator().manual_seed(3)))
    s, t = rand(N, CS, H, W, seed=8).float(), rand(N, CT, H, W, seed=9).float()
    a = module(s, t)
    module.rng = torch.Generator().manual_seed(3)
    assert module(s, t).item() == pytest.approx(a.item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------
# Af-DCD
# ------------------------------------------------------------------------------------------------
def ref_omni(preds, targets, groups: int, patch: int, pool: int, tau: float) -> float:
    n, c, h, w = preds.shape
    if pool:
        ph, pw = h // pool, w // pool
        def mp(x):
            out = torch.empty(n, c, ph, pw, dtype=torch.float64)
            for i in range(ph):
                for j in range(pw):
                    out[:, :, i, j] = x[:, :, i * pool:(i + 1) * pool, j * pool:(j + 1) * pool].amax(dim=(2, 3))
            return out
        preds, targets, h, w = mp(preds), mp(targets), ph, pw
    h, w = h - h % patch, w - w % patch
    d = c // groups
    total = 0.0
    for b in range(n):
        for pi in range(0, h, patch):
            for pj in range(0, w, patch):
                vectors = []  # (position, group) -> (anchor vector, target vector, group)
                for y in range(pi, pi + patch):
                    for x in range(pj, pj + patch):
                        for g in range(groups):
                            ch = range(g * d, (g + 1) * d)
                            vectors.append(([float(preds[b, k, y, x]) for k in ch],
                                            [float(targets[b, k, y, x]) for k in ch], g))
                for a_vec, a_tgt, a_g in vectors:
                    pos = -sum(abs(u - v) for u, v in zip(a_vec, a_tgt)) / tau
                    neg = [-sum(abs(u - v) for u, v in zip(a_vec, b_tgt)) / tau
                           for _, b_tgt, b_g in vectors if b_g != a_g]
                    m = max([pos, *neg])
                    total += -(pos - m - math.log(sum(math.exp(v - m) for v in [pos, *neg])))
    return total / (n * h * w)


@pytest.mark.parametrize("pool, patch, groups", [(2, 2, 2), (0, 2, 4), (3, 1, 2)])
def test_afdcd_contrast_matches_the_patch_loop(pool, patch, groups):
    hh, ww = 9, 11
    p, t = rand(N, CT, hh, ww, seed=10, scale=0.5), rand(N, CT, hh, ww, seed=11, scale=0.5)
    got = omni_contrastive(p, t, groups, patch, pool, 0.07).item()
    assert got == pytest.approx(ref_omni(p, t, groups, patch, pool, 0.07), rel=1e-9)


def test_afdcd_forward_is_the_weighted_reconstruction_plus_contrast():
    torch.manual_seed(0)
    module = CriterionAfDCD(CS, CT, fd=0.5, ctr=0.25, groups=2, patch=2, pool=2).double()
    hh, ww = 9, 10
    s, t = rand(N, CS, hh, ww, seed=12), rand(N, CT, hh, ww, seed=13)
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(N, 1, hh, ww, generator=g) > 0.5).double()
    rec = regenerate_loop(module, s, mask)
    fd = sum(float(v) ** 2 for v in (rec - t).flatten()) / N
    ref = 0.5 * fd + 0.25 * ref_omni(rec, t, 2, 2, 2, 0.07)
    assert module(s, t, mask=mask).item() == pytest.approx(ref, rel=1e-9)


def test_afdcd_fixed_mask_drops_the_central_third():
    module = CriterionAfDCD(CS, CT, rand_mask=False, groups=2)
    m = module._mask(torch.zeros(N, CT, 9, 12))
    assert m[:, :, 3:6, 4:8].sum() == 0 and m.sum() == N * (9 * 12 - 3 * 4)
    with pytest.raises(ValueError, match="multiple of groups"):
        CriterionAfDCD(CS, 10, groups=16)


# ------------------------------------------------------------------------------------------------
# CIRKD: mini-batch relation
# ------------------------------------------------------------------------------------------------
def ref_minibatch(s, t, tau: float) -> float:
    n, _, h, w = t.shape
    sv = [[l2n(pix(s, b, y, x)) for y in range(h) for x in range(w)] for b in range(n)]
    tv = [[l2n(pix(t, b, y, x)) for y in range(h) for x in range(w)] for b in range(n)]
    total = 0.0
    for i in range(n):
        for j in range(n):
            rows = 0.0
            for p in range(h * w):
                qs = softmax([sum(a * b for a, b in zip(sv[i][p], sv[j][q])) / tau for q in range(h * w)])
                qt = softmax([sum(a * b for a, b in zip(tv[i][p], tv[j][q])) / tau for q in range(h * w)])
                rows += kl(qt, qs)
            total += rows / (h * w)
    return total / (n * n)


def test_cirkd_minibatch_matches_the_pair_loop_and_its_gradient_survives_checkpointing():
    s, t = rand(N, CS, H, W, seed=14), rand(N, CT, H, W, seed=15)
    module = CriterionCIRKDMiniBatch(0.1)
    assert module(s, t).item() == pytest.approx(ref_minibatch(s, t, 0.1), rel=1e-10)
    # the checkpointed rows give the gradient of the plain computation
    sg = s.clone().requires_grad_(True)
    module(sg, t).backward()
    plain = s.clone().requires_grad_(True)
    from cwdseg.distill.cirkd import _relation_row
    sn = F.normalize(plain, dim=1).flatten(2).transpose(1, 2)
    tn = F.normalize(t, dim=1).flatten(2).transpose(1, 2)
    (sum(_relation_row(i, sn, tn, 0.1) for i in range(N)) / N ** 2).backward()
    assert torch.allclose(sg.grad, plain.grad, rtol=1e-10, atol=1e-14)


# ------------------------------------------------------------------------------------------------
# CIRKD: memory bank
# ------------------------------------------------------------------------------------------------
MEM = dict(pixel_memory=5, region_memory=3, pixel_contrast=4, region_contrast=2, pixel_update=2)


def memory_module(seed: int = 0, **kw) -> CriterionCIRKDMemory:
    torch.manual_seed(seed)
    opts = {**MEM, **kw}
    return CriterionCIRKDMemory(CS, CT, 3, IGNORE, rng=torch.Generator().manual_seed(42), **opts).double()


def ref_memory_step(module, pixel_q, pixel_ptr, region_q, region_ptr, s_proj, t, y, rule="authors"):
    """One step of the reference by loops: enqueue, draw, contrast. Mutates the copies given."""
    g = torch.Generator().manual_seed(42)
    k_classes, size = pixel_q.shape[0], pixel_q.shape[1]
    n, c, h, w = t.shape
    tn = [[l2n(pix(t, b, yy, xx)) for yy in range(h) for xx in range(w)] for b in range(n)]
    for b in range(n):
        flat = [int(v) for v in y[b].flatten()]
        for cls in sorted(set(flat)):
            if cls == IGNORE:
                continue
            idx = [p for p, v in enumerate(flat) if v == cls]
            mean = [sum(tn[b][p][ch] for p in idx) / len(idx) for ch in range(c)]
            region_q[cls, int(region_ptr[cls])] = torch.tensor(l2n(mean), dtype=torch.float64)
            region_ptr[cls] = (int(region_ptr[cls]) + 1) % region_q.shape[1]
            perm = torch.randperm(len(idx), generator=g).tolist()
            kk = min(len(idx), MEM["pixel_update"])
            chosen = perm[:kk] if rule == "authors" else [idx[q] for q in perm[:kk]]
            vecs = torch.tensor([l2n(tn[b][p]) for p in chosen], dtype=torch.float64)
            ptr = int(pixel_ptr[cls])
            if ptr + kk >= size:
                pixel_q[cls, size - kk:] = vecs
                pixel_ptr[cls] = 0
            else:
                pixel_q[cls, ptr:ptr + kk] = vecs
                pixel_ptr[cls] = ptr + kk
    valid = [(b, p) for b in range(n) for p in range(h * w) if int(y[b].flatten()[p]) != IGNORE]
    pi = torch.randperm(size, generator=g)[:MEM["pixel_contrast"] // k_classes + 1].tolist()
    ri = torch.randperm(region_q.shape[1], generator=g)[:MEM["region_contrast"] // k_classes + 1].tolist()
    bank_p = [pixel_q[k, i].tolist() for k in range(k_classes) for i in pi]
    bank_r = [region_q[k, i].tolist() for k in range(k_classes) for i in ri]
    out = []
    for bank in (bank_p, bank_r):
        total = 0.0
        for b, p in valid:
            sv = l2n(pix(s_proj, b, p // w, p % w))
            qs = softmax([sum(a * x for a, x in zip(sv, e)) / 0.1 for e in bank])
            qt = softmax([sum(a * x for a, x in zip(tn[b][p], e)) / 0.1 for e in bank])
            total += kl(qt, qs)
        out.append(total / len(valid))
    return out


@pytest.mark.parametrize("rule", ["authors", "class"])
def test_cirkd_memory_matches_the_enqueue_and_contrast_loops(rule):
    module = memory_module(enqueue=rule).train()
    s, t = rand(N, CS, H, W, seed=16), rand(N, CT, H, W, seed=17)
    y = labels(k=3)
    pq, pp = module.pixel_queue.clone(), module.pixel_ptr.clone()
    rq, rp = module.region_queue.clone(), module.region_ptr.clone()
    module.project.eval()                   # the head's BN in eval mode: the same map in both computations
    with torch.no_grad():
        s_proj = module.project(s)
    parts = module.parts(s, t, y)
    ref_p, ref_r = ref_memory_step(module, pq, pp, rq, rp, s_proj, t, y, rule)
    assert parts["pixel"].item() == pytest.approx(ref_p, rel=1e-10)
    assert parts["region"].item() == pytest.approx(ref_r, rel=1e-10)
    # the same slots written with the same vectors (summation order may differ in the last bit)
    assert torch.allclose(module.pixel_queue, pq, rtol=0, atol=1e-14) and torch.equal(module.pixel_ptr, pp)
    assert torch.allclose(module.region_queue, rq, rtol=0, atol=1e-14) and torch.equal(module.region_ptr, rp)


def test_cirkd_memory_class_rule_enqueues_only_the_class_pixels():
    # teacher vectors that say which class their pixel has: the class rule must store only matching ones
    y = torch.zeros(1, 4, 4, dtype=torch.long)
    y[0, 2:] = 1
    t = F.one_hot(y, 8).permute(0, 3, 1, 2).double() + 0.01
    for rule, expect_pure in (("class", True), ("authors", False)):
        module = CriterionCIRKDMemory(CS, 8, 2, IGNORE, rng=torch.Generator().manual_seed(0), pixel_memory=50,
                                      region_memory=3, pixel_update=8, enqueue=rule).double()
        module(rand(1, CS, 4, 4, seed=1), t, y)
        stored = module.pixel_queue[1, :8]
        pure = bool((stored.argmax(dim=1) == 1).all())
        assert pure == expect_pure, rule


def test_cirkd_memory_state_survives_save_and_load_bitwise():
    a = memory_module(seed=0)
    y = labels(k=3)
    for step in range(2):
        a(rand(N, CS, H, W, seed=20 + step), rand(N, CT, H, W, seed=30 + step), y)
    assert int(a.pixel_ptr.sum()) > 0 and int(a.region_ptr.sum()) > 0
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = memory_module(seed=1)   # different initial queues and weights
    b.load_state_dict(torch.load(buf, weights_only=True))
    for name in ("pixel_queue", "pixel_ptr", "region_queue", "region_ptr"):
        assert name in a.state_dict()
        assert torch.equal(getattr(a, name), getattr(b, name)) and getattr(b, name).dtype == getattr(a, name).dtype
    a.rng, b.rng = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    s, t = rand(N, CS, H, W, seed=40), rand(N, CT, H, W, seed=41)
    assert torch.equal(a(s, t, y), b(s, t, y))
    assert torch.equal(a.pixel_queue, b.pixel_queue)


def test_cirkd_memory_all_ignored_batch_gives_zero_and_leaves_the_bank():
    module = memory_module()
    before = module.pixel_queue.clone()
    s = rand(N, CS, H, W, seed=1).requires_grad_(True)
    loss = module(s, rand(N, CT, H, W, seed=2), torch.full((N, H, W), IGNORE))
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(s.grad).all()
    assert torch.equal(module.pixel_queue, before)


# ------------------------------------------------------------------------------------------------
# BPKD
# ------------------------------------------------------------------------------------------------
def ref_edge_band(y, k: int, kernel: int, h: int, w: int) -> torch.Tensor:
    n, h0, w0 = y.shape
    r = kernel // 2
    band = torch.zeros(n, h0, w0, dtype=torch.float64)
    for b in range(n):
        for i in range(h0):
            for j in range(w0):
                window = [int(y[b, a, c]) for a in range(max(0, i - r), min(h0, i + r + 1))
                          for c in range(max(0, j - r), min(w0, j + r + 1))]
                for cls in range(k):
                    dil = any(v == cls for v in window)
                    ero = all(v == cls for v in window)
                    band[b, i, j] = max(band[b, i, j], float(dil) - float(ero))
    out = torch.zeros(n, h, w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            i0, i1 = (i * h0) // h, -(-((i + 1) * h0) // h)
            j0, j1 = (j * w0) // w, -(-((j + 1) * w0) // w)
            out[:, i, j] = band[:, i0:i1, j0:j1].mean(dim=(1, 2))
    return out


def ref_bpkd(s, t, y, k, T, alpha, kernel, norm) -> tuple[float, float]:
    n, _, h, w = t.shape
    m = ref_edge_band(y, k, kernel, h, w)
    edge, mass, count = 0.0, 0.0, 0
    for b in range(n):
        for i in range(h):
            for j in range(w):
                mm = float(m[b, i, j])
                ps = softmax([mm * a / T for a in pix(s, b, i, j)])
                pt = softmax([mm * a / T for a in pix(t, b, i, j)])
                edge += mm * kl(pt, ps)
                mass += mm
                count += mm > 0
    denom = {"mass": mass, "count": count, "pixels": n * h * w}[norm]
    edge = alpha * T * T * edge / denom
    body = 0.0
    for b in range(n):
        for c in range(t.shape[1]):
            ps = softmax([(1 - float(m[b, i, j])) * float(s[b, c, i, j]) / T for i in range(h) for j in range(w)])
            pt = softmax([(1 - float(m[b, i, j])) * float(t[b, c, i, j]) / T for i in range(h) for j in range(w)])
            body += kl(pt, ps)
    return edge, body * T * T / (n * t.shape[1])


@pytest.mark.parametrize("norm, T, kernel, label_size", [("mass", 1.0, 7, (10, 14)), ("count", 2.0, 3, (11, 13)),
                                                         ("pixels", 1.5, 5, (5, 7))])
def test_bpkd_matches_the_band_and_region_loops(norm, T, kernel, label_size):
    s, t = rand(N, K, H, W, seed=50), rand(N, K, H, W, seed=51)
    y = labels(*label_size, seed=2)
    module = CriterionBPKD(K, IGNORE, edge=3.0, body=2.0, alpha=2.0, T=T, kernel=kernel, edge_norm=norm)
    parts = module.parts(s, t, y)
    edge, body = ref_bpkd(s, t, y, K, T, 2.0, kernel, norm)
    assert parts["edge"].item() == pytest.approx(edge, rel=1e-10)
    assert parts["body"].item() == pytest.approx(body, rel=1e-10)
    assert module(s, t, y).item() == pytest.approx(3 * edge + 2 * body, rel=1e-10)


def test_bpkd_uniform_labels_have_no_edge():
    s, t = rand(N, K, H, W, seed=52), rand(N, K, H, W, seed=53)
    parts = CriterionBPKD(K, IGNORE).parts(s, t, torch.ones(N, 10, 14, dtype=torch.long))
    assert parts["edge"].item() == 0 and parts["body"].item() > 0


# ------------------------------------------------------------------------------------------------
# Common properties: student-only gradients (and the term's own modules), bf16 autocast, resizing
# ------------------------------------------------------------------------------------------------
def new_terms():
    """(id, module factory, student channels, teacher channels)."""
    return [
        ("lskd", lambda: CriterionLSKD(ignore_mask=True, ignore_label=IGNORE), K, K),
        ("bpkd", lambda: CriterionBPKD(K, IGNORE), K, K),
        ("cirkd_batch", lambda: CriterionCIRKDMiniBatch(), CS, CT),
        ("cirkd_mem", lambda: CriterionCIRKDMemory(CS, CT, K, IGNORE, **MEM), CS, CT),
        ("mgd", lambda: CriterionMGD(CS, CT), CS, CT),
        ("afdcd", lambda: CriterionAfDCD(CS, CT, groups=2, patch=2, pool=2), CS, CT),
    ]


@pytest.mark.parametrize("name, make, cs, ct", new_terms(), ids=[t[0] for t in new_terms()])
def test_gradient_reaches_the_student_and_the_terms_own_modules_only(name, make, cs, ct):
    module = make()
    s = rand(N, cs, H, W, seed=60).float().requires_grad_(True)
    t = rand(N, ct, H + 2, W + 2, seed=61).float().requires_grad_(True)   # the student map is resized
    module(s, t, labels(H + 2, W + 2)).backward()
    assert t.grad is None, f"{name}: gradient reached the teacher map"
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    for pname, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: no gradient for {pname}"


@pytest.mark.parametrize("name, make, cs, ct", new_terms(), ids=[t[0] for t in new_terms()])
def test_finite_under_bf16_autocast(name, make, cs, ct):
    module = make()
    s = (rand(N, cs, H, W, seed=62) * 20).bfloat16().requires_grad_(True)
    t = (rand(N, ct, H, W, seed=63) * 20).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module(s, t, labels())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad.float()).all()


# ------------------------------------------------------------------------------------------------
# Options and the registry
# ------------------------------------------------------------------------------------------------
def test_options_report_their_bounds_in_one_line():
    with pytest.raises(OptionError, match=r"^option tau must be > 0, got -1$"):
        check_option("tau", Option(1.0, low=0, low_open=True), -1)
    with pytest.raises(OptionError, match=r"option mask_ratio must be >= 0 and < 1, got 1.0"):
        CriterionMGD(CS, CT, mask_ratio=1.0)
    with pytest.raises(OptionError, match="option groups must be an integer"):
        CriterionAfDCD(CS, CT, groups="2.5")
    with pytest.raises(OptionError, match="unknown option 'temperature'"):
        CriterionAfDCD(CS, CT, temperature=1.0)
    with pytest.raises(OptionError, match="must be one of authors, class"):
        CriterionCIRKDMemory(CS, CT, K, enqueue="mine")
    assert check_option("pool", Option(4, low=0), "0") == 0


def test_registry_builds_every_new_term_and_preset_with_channels():
    new = ("lskd", "cirkd_kd", "cirkd_batch", "cirkd_mem", "mgd", "afdcd", "bpkd")
    assert list(METHODS)[-len(new):] == list(new)
    for name in new:
        opts = complete(name, parse_distill([f"{name}=1"])[name])
        module = build_term(name, opts, K, IGNORE, student_channels=CS, teacher_channels=16)
        assert isinstance(module, torch.nn.Module)
    with pytest.raises(ValueError, match="pass student_channels= and teacher_channels="):
        build_term("mgd", complete("mgd", {"weight": 1.0}), K, IGNORE)
    for preset in ("cirkd", "mgd", "afdcd", "lskd", "bpkd"):
        spec = preset_spec(preset)
        assert len(spec) == len(PRESETS[preset].terms) and PRESETS[preset].source
    spec = preset_spec("afdcd")
    assert spec["afdcd"]["fd"] == 2e-6 and spec["afdcd"]["ctr"] == 0.005 and spec["cirkd_kd"]["T"] == 1.0
    assert preset_spec("lskd")["lskd"] == {"weight": 9.0, "on": "logits", "T": 2.0,
                                                                       "standardize": True, "ignore_mask": False}

"""Synchronised ABN through SyncBatchNorm-style kernels: the kernels against hand formulas, the autograd
function against one big batch in two processes, and (CUDA only) torch's native kernels against ours."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cwdseg.models import abn as abn_mod
from cwdseg.models.abn import ABN, convert_sync_abn

K = abn_mod._PLAIN_KERNELS
EPS = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_abn(seed: int = 0, channels: int = 6, dtype=torch.float32) -> ABN:
    g = torch.Generator().manual_seed(seed)
    m = ABN(channels)
    with torch.no_grad():
        m.weight.copy_(torch.randn(channels, generator=g))  # negative entries: |w| + eps matters
        m.bias.copy_(torch.randn(channels, generator=g))
        m.running_mean.copy_(torch.randn(channels, generator=g))
        m.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
    return m.to(dtype)


def _hand_mean_var(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance by explicit loops over the channel planes."""
    c = x.shape[1]
    means, variances = [], []
    for k in range(c):
        values = x[:, k].reshape(-1)
        mu = values.sum() / values.numel()
        means.append(mu)
        variances.append(((values - mu) ** 2).sum() / values.numel())
    return torch.stack(means), torch.stack(variances)


@pytest.fixture()
def gloo_world_of_one():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_plain_kernels_match_hand_formulas():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 4, 3, 6, generator=g, dtype=torch.float64) * 2 + 0.5
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    w = torch.randn(4, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    mean, var = _hand_mean_var(x)
    invstd = 1 / torch.sqrt(var + EPS)

    # stats of two unequal shards, combined, equal the whole batch's (and update the running stats)
    parts = [x[:3], x[3:]]
    shard_stats = [K.stats(p, EPS) for p in parts]  # float64 in, float64 statistics (as the native kernels)
    mean_all = torch.stack([s[0] for s in shard_stats])
    invstd_all = torch.stack([s[1] for s in shard_stats])
    counts = torch.tensor([3 * 18.0, 2 * 18.0], dtype=torch.float64)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    g_mean, g_invstd = K.gather_stats_with_counts(x, mean_all, invstd_all, rm, rv, 0.1, EPS, counts)
    assert torch.allclose(g_mean, mean, atol=1e-12) and torch.allclose(g_invstd, invstd, atol=1e-10)
    n = x.numel() / 4
    assert torch.allclose(rm, 0.1 * mean, atol=1e-12)
    assert torch.allclose(rv, 0.9 + 0.1 * var * n / (n - 1), atol=1e-10)

    # elemt: (x - mean) * invstd * w + b
    y = K.elemt(x, w, b, mean, invstd, EPS)
    expected = (x - mean[None, :, None, None]) * invstd[None, :, None, None] * w[None, :, None, None] + b[None, :, None, None]
    assert y.dtype == torch.float64 and torch.allclose(y, expected, atol=1e-12)

    # backward: against autograd of the formula (batch statistics), in float64
    xr = x.clone().requires_grad_(True)
    wr = w.clone().requires_grad_(True)
    br = b.clone().requires_grad_(True)
    mu = xr.mean(dim=(0, 2, 3), keepdim=True)
    sd = torch.sqrt(((xr - mu) ** 2).mean(dim=(0, 2, 3), keepdim=True) + EPS)
    ((xr - mu) / sd * wr[None, :, None, None] + br[None, :, None, None]).mul(dy).sum().backward()
    sum_dy, sum_dy_xmu, grad_w, grad_b = K.backward_reduce(dy, x, mean, invstd, w, True, True, True)
    assert torch.allclose(sum_dy, dy.sum(dim=(0, 2, 3)), atol=1e-12)
    assert torch.allclose(grad_w, wr.grad, atol=1e-10) and torch.allclose(grad_b, br.grad, atol=1e-10)
    grad_x = K.backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu,
                              torch.tensor([3 * 18, 2 * 18], dtype=torch.int32))  # counts per rank, summed
    assert torch.allclose(grad_x, xr.grad, atol=1e-10)


def test_world_of_one_equals_plain_batch_norm(gloo_world_of_one):
    """With one process, the synchronised function is ordinary training-mode ABN: outputs, gradients of the
    input, weight (through |w| + eps) and bias, and running statistics."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, 4, 5, generator=g, dtype=torch.float64) * 2 - 1
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    ref, sync = _make_abn(dtype=torch.float64).train(), convert_sync_abn(_make_abn(dtype=torch.float64), kernels="plain")
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (ref(xa) * dy).sum().backward()
    (sync.train()(xb) * dy).sum().backward()
    assert torch.allclose(xb.grad, xa.grad, atol=1e-10)
    for name in ("weight", "bias"):
        assert torch.allclose(getattr(sync, name).grad, getattr(ref, name).grad, atol=1e-9), name
    for name in ("running_mean", "running_var"):
        assert torch.allclose(getattr(sync, name), getattr(ref, name), atol=1e-12), name


def test_native_kernels_are_refused_off_cuda(gloo_world_of_one):
    m = convert_sync_abn(_make_abn(), kernels="native").train()
    with pytest.raises(RuntimeError, match="CUDA"):
        m(torch.randn(2, 6, 3, 3))


def test_auto_uses_the_sums_off_cuda(gloo_world_of_one, monkeypatch):
    calls = []
    monkeypatch.setattr(abn_mod._SyncABNFunction, "apply", lambda *a: calls.append(a))
    convert_sync_abn(_make_abn()).train()(torch.randn(2, 6, 3, 3))
    assert calls == []


def test_unknown_kernels_is_an_error():
    with pytest.raises(ValueError, match="'fast'"):
        convert_sync_abn(ABN(3), kernels="fast")


def _sync_worker(rank, world, port, shards, grads, out_q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    m = convert_sync_abn(_make_abn(), kernels="plain").train()
    shard = shards[rank].clone().requires_grad_(True)
    y = m(shard)
    (y * grads[rank]).sum().backward()
    out_q.put((rank, *(t.detach().numpy().copy() for t in (y, shard.grad, m.weight.grad, m.bias.grad,
                                                            m.running_mean, m.running_var))))
    dist.destroy_process_group()


def test_two_processes_with_unequal_shards_equal_one_big_batch():
    """Ranks with 3 and 1 images: the gathered (mean, invstd, count) give the whole batch's statistics."""
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 5) * 3 + 1
    grad_out = torch.randn(4, 6, 5, 5)
    shards, grads = list(x.split([3, 1])), list(grad_out.split([3, 1]))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_sync_worker, args=(r, 2, port, shards, grads, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    full = _make_abn().train()
    xf = x.clone().requires_grad_(True)
    (full(xf) * grad_out).sum().backward()
    results = [[torch.from_numpy(a) for a in r[1:]] for r in results]
    y_ref = _make_abn().train()(x).detach()
    assert torch.allclose(torch.cat([r[0] for r in results]), y_ref, atol=1e-5)
    assert torch.allclose(torch.cat([r[1] for r in results]), xf.grad, atol=1e-5)
    assert torch.allclose(results[0][2] + results[1][2], full.weight.grad, atol=1e-4)
    assert torch.allclose(results[0][3] + results[1][3], full.bias.grad, atol=1e-4)
    fresh = _make_abn().train()
    fresh(x)
    for r in results:
        assert torch.allclose(r[4], fresh.running_mean, atol=1e-6)
        assert torch.allclose(r[5], fresh.running_var, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's batch_norm_stats kernels are CUDA-only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_cuda_kernels_equal_the_plain_ones(dtype):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        x = (torch.randn(4, 32, 9, 9, device="cuda") * 2 + 1).to(dtype)
        dy = torch.randn(x.shape, device="cuda").to(dtype)
        out = {}
        for kernels in ("plain", "native", "sums"):
            m = convert_sync_abn(_make_abn(channels=32).cuda(), kernels=kernels).train()
            xi = x.clone().requires_grad_(True)
            y = m(xi)
            (y.float() * dy.float()).sum().backward()
            assert y.dtype == dtype
            out[kernels] = [t.float() for t in (y.detach(), xi.grad, m.weight.grad, m.bias.grad, m.running_mean,
                                                m.running_var)]
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        for a, b, c in zip(out["plain"], out["native"], out["sums"]):
            assert torch.allclose(a, b, atol=tol, rtol=tol) and torch.allclose(c, b, atol=tol, rtol=tol)
    finally:
        dist.destroy_process_group()

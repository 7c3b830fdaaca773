"""The ABN layer against the formulas, and its cross-process statistics against one big batch."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from cwdseg.models.abn import ABN, convert_sync_abn


def reference_abn(x, weight, bias, running_mean, running_var, training, eps=1e-5, slope=0.01, activation="leaky_relu"):
    """Batch norm written out with the InPlace-ABN scale |w| + eps, then the activation."""
    if training:
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = running_mean, running_var
    y = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + eps)
    y = y * (weight.abs() + eps)[None, :, None, None] + bias[None, :, None, None]
    if activation == "leaky_relu":
        y = torch.where(y >= 0, y, slope * y)
    elif activation == "relu":
        y = y.clamp_min(0)
    return y


def make_abn(activation="leaky_relu", seed=0):
    g = torch.Generator().manual_seed(seed)
    m = ABN(6, activation=activation)
    with torch.no_grad():
        m.weight.copy_(torch.randn(6, generator=g))  # some negative, as in the released files
        m.bias.copy_(torch.randn(6, generator=g))
        m.running_mean.copy_(torch.randn(6, generator=g))
        m.running_var.copy_(torch.rand(6, generator=g) + 0.5)
    return m


@pytest.mark.parametrize("activation", ["leaky_relu", "relu", "none"])
@pytest.mark.parametrize("training", [True, False])
def test_forward_matches_the_formula(activation, training):
    m = make_abn(activation).train(training)
    x = torch.randn(4, 6, 5, 7, dtype=torch.float64)
    m.double()
    expected = reference_abn(x, m.weight, m.bias, m.running_mean.clone(), m.running_var.clone(), training,
                             activation=activation)
    assert torch.allclose(m(x), expected, atol=1e-10)


def test_running_statistics_use_the_unbiased_variance():
    m = make_abn()
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    x = torch.randn(3, 6, 4, 4)
    m.train()(x)
    n = 3 * 4 * 4
    assert torch.allclose(m.running_mean, 0.9 * rm + 0.1 * x.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(m.running_var, 0.9 * rv + 0.1 * x.var(dim=(0, 2, 3), unbiased=False) * n / (n - 1), atol=1e-6)


def test_state_dict_has_the_original_four_keys():
    assert list(ABN(3).state_dict()) == ["weight", "bias", "running_mean", "running_var"]


def test_unknown_activation_is_an_error():
    with pytest.raises(ValueError, match="'gelu'"):
        ABN(3, activation="gelu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_worker(rank, world, port, x, grad_out, out_q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    m = convert_sync_abn(make_abn()).train()
    shard = x.chunk(world)[rank].clone().requires_grad_(True)
    y = m(shard)
    (y * grad_out.chunk(world)[rank]).sum().backward()
    # numpy copies travel by value (a shared-memory tensor dies with this process)
    out_q.put((rank, *(t.detach().numpy().copy() for t in (y, shard.grad, m.weight.grad, m.running_mean,
                                                            m.running_var))))
    torch.distributed.destroy_process_group()


def test_cross_process_statistics_equal_one_big_batch():
    """Two gloo processes with half the batch each give the outputs, input gradients and running
    statistics of one process with the whole batch (the InPlaceABNSync semantics)."""
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 5) * 3 + 1
    grad_out = torch.randn(4, 6, 5, 5)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_sync_worker, args=(r, 2, port, x, grad_out, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    full = make_abn().train()
    xf = x.clone().requires_grad_(True)
    yf = full(xf)
    (yf * grad_out).sum().backward()
    results = [(r[0], *(torch.from_numpy(a) for a in r[1:])) for r in results]
    y = torch.cat([r[1] for r in results])
    gx = torch.cat([r[2] for r in results])
    assert torch.allclose(y, yf.detach(), atol=1e-5)
    assert torch.allclose(gx, xf.grad, atol=1e-5)
    for r in results:  # each rank's weight gradient is its share; DDP sums/averages them
        assert torch.allclose(r[4], full.running_mean, atol=1e-6)
        assert torch.allclose(r[5], full.running_var, atol=1e-5)
    assert torch.allclose(results[0][3] + results[1][3], full.weight.grad, atol=1e-4)

"""The combination of many BatchNorm partial rows in the C++ ops (fastconv/batch_norm.h: passes of chunks of
512 rows, 8 lanes per channel, a tree): its geometry (fastconv::ext_batch_norm_plan) bounds every thread's
serial loop for any T, and ext_batch_norm_finalize / the backward's sums stay float64-accurate and
deterministic over thousands of partial rows, empty ones included. 'cuda' runs the same checks on a GPU."""
from __future__ import annotations

import pytest
import torch

from .backends import EXT_BACKENDS, skip_unless_runnable
from .helpers import generator

MAX_SERIAL = 1024  # merges one thread may do in sequence (issue 14: the finalize looped over all T rows)
PLAN_FIELDS = 5    # per pass: rows, chunks, rows_per_chunk, channel_blocks, serial


def _ops():
    import fastconv.ops.conv_bn_act as bn_ops

    bn_ops.ext_ops()  # loads the extension and registers the fakes

    return torch.ops.fastconv


def _plan(T, C):
    flat = _ops().ext_batch_norm_plan(T, C)
    assert len(flat) % PLAN_FIELDS == 0 and flat
    return [flat[i:i + PLAN_FIELDS] for i in range(0, len(flat), PLAN_FIELDS)]


@pytest.mark.parametrize("C", [1, 64, 2049])
def test_plan_bounds_every_threads_serial_loop(C):
    skip_unless_runnable("cpu")
    Ts = [0, 1, 7, 511, 512, 513, 4096, 25_088, 50_176, 262_144, 262_145, 999_983, 10**6, 2**31 - 1]
    Ts += torch.randint(1, 10**6, (40,), generator=generator("bn-plan", C)).tolist()
    for T in Ts:
        plan = _plan(T, C)
        assert plan[0][0] == T and plan[-1][1] == 1, (T, plan)
        for i, (rows, chunks, per_chunk, channel_blocks, serial) in enumerate(plan):
            assert chunks * per_chunk >= rows and (chunks - 1) * per_chunk < max(rows, 1), (T, plan)
            assert channel_blocks * 32 >= C > (channel_blocks - 1) * 32
            assert serial <= MAX_SERIAL and serial <= per_chunk // 8 + 4, (T, plan)
            if i + 1 < len(plan):
                assert plan[i + 1][0] == chunks and chunks > 1  # the next pass combines this pass's chunks
        assert len(plan) <= 4  # log_512(2**31) passes at most


def _partials(gen, T, C, dtype):
    """[T, C] (count, mean, M2) of real data: per row a segment of values, counts from 0 to thousands (a
    third of the rows empty), row means spread around an offset; also the float64 data per channel."""
    counts = torch.randint(0, 64, (T, C), generator=gen)
    counts[torch.rand(T, C, generator=gen) < 1 / 3] = 0
    counts[torch.rand(T, C, generator=gen) < 0.01] = 3000
    counts[torch.rand(T, C, generator=gen) < 0.05] = 1
    cnt, mean, m2 = (torch.zeros(T, C, dtype=torch.float64) for _ in range(3))
    data = []
    for c in range(C):
        n = counts[:, c]
        row = torch.repeat_interleave(torch.arange(T), n)
        shift = torch.rand(T, generator=gen, dtype=torch.float64) * 4 - 2
        x = 3.0 + shift[row] + 2.0 * torch.randn(row.numel(), generator=gen, dtype=torch.float64)
        s = torch.zeros(T, dtype=torch.float64).index_add_(0, row, x)
        mu = torch.where(n > 0, s / n.clamp(min=1), torch.zeros_like(s))
        cnt[:, c], mean[:, c] = n.double(), mu
        m2[:, c] = torch.zeros(T, dtype=torch.float64).index_add_(0, row, (x - mu[row]) ** 2)
        data.append(x)
    return cnt.to(dtype), mean.to(dtype), m2.to(dtype), data


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("ext_backend", EXT_BACKENDS)
def test_finalize_many_partial_rows_matches_float64(ext_backend, dtype, rtol):
    skip_unless_runnable(ext_backend)
    gen = generator("bn-finalize-many", str(dtype))
    T, C = 6000, 3  # two passes: 12 chunks, then one
    cnt, mean_p, m2_p, data = _partials(gen, T, C, dtype)
    assert len(_plan(T, C)) == 2 and (cnt == 0).any() and cnt.max() >= 3000
    bias = torch.tensor([0.5, -1.0, 0.0], dtype=dtype)
    dev = ext_backend
    mean, var = _ops().ext_batch_norm_finalize(cnt.to(dev), mean_p.to(dev), m2_p.to(dev), bias.to(dev))
    ref_mean = torch.stack([x.mean() for x in data]) + bias.double()
    ref_var = torch.stack([x.var(unbiased=False) for x in data])
    assert mean.dtype == dtype and var.dtype == dtype
    torch.testing.assert_close(mean.cpu().double(), ref_mean, rtol=rtol, atol=0)
    torch.testing.assert_close(var.cpu().double(), ref_var, rtol=rtol, atol=0)


@pytest.mark.parametrize("ext_backend", EXT_BACKENDS)
def test_finalize_empty_and_single_pass_edges(ext_backend):
    skip_unless_runnable(ext_backend)
    ops = _ops()
    for T in (0, 1, 512, 513):
        cnt = torch.zeros(T, 33, device=ext_backend)
        if T:
            cnt[-1] = 2.0  # only the last row holds values: (1, 3) per channel
        mean_p = torch.full((T, 33), 2.0, device=ext_backend)
        m2_p = torch.full((T, 33), 2.0, device=ext_backend)
        mean, var = ops.ext_batch_norm_finalize(cnt, mean_p, m2_p, None)
        want = 2.0 if T else 0.0
        assert torch.equal(mean, torch.full_like(mean, want)) and torch.equal(var, torch.full_like(var, want / 2))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("ext_backend", EXT_BACKENDS)
def test_stats_and_backward_sums_over_two_passes(ext_backend, dtype, rtol, layout):
    """Over 512 tile rows (CPU tiles: 1024 pixels, CUDA: 512), the partials of ext_batch_norm_stats and the
    backward's tile sums take two passes; both match float64."""
    skip_unless_runnable(ext_backend)
    ops = _ops()
    gen = generator("bn-two-pass", str(dtype), layout)
    shape = (9, 2, 256, 256)  # 589,824 pixels: 576 CPU tiles, 1152 CUDA tiles
    zd = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1.5
    gyd = torch.randn(shape, generator=gen, dtype=torch.float64)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    z = zd.to(dtype).contiguous(memory_format=fmt).to(ext_backend)
    gy = gyd.to(dtype).contiguous(memory_format=fmt).to(ext_backend)
    zd, gyd = z.cpu().double(), gy.cpu().double()
    cnt, mean_p, m2_p = ops.ext_batch_norm_stats(z)
    assert len(_plan(cnt.shape[0], 2)) == 2
    mean, var = ops.ext_batch_norm_finalize(cnt, mean_p, m2_p, None)
    torch.testing.assert_close(mean.cpu().double(), zd.mean((0, 2, 3)), rtol=rtol, atol=0)
    torch.testing.assert_close(var.cpu().double(), zd.var((0, 2, 3), unbiased=False), rtol=rtol, atol=0)

    eps = 1e-5
    _, sum_g, sum_gx, _ = ops.ext_batch_norm_act_backward(gy, z, mean, var, None, None, None, eps, "identity", False)
    xhat = (zd - mean.cpu().double().view(1, -1, 1, 1)) / torch.sqrt(var.cpu().double().view(1, -1, 1, 1) + eps)
    scale = gyd.abs().sum((0, 2, 3))  # the sums' condition: cancellation makes them small next to it
    torch.testing.assert_close(sum_g.cpu().double() / scale, gyd.sum((0, 2, 3)) / scale, rtol=0, atol=rtol)
    torch.testing.assert_close(sum_gx.cpu().double() / scale, (gyd * xhat).sum((0, 2, 3)) / scale, rtol=0, atol=rtol)


def test_cpu_combination_does_not_depend_on_threads():
    skip_unless_runnable("cpu")
    cnt, mean_p, m2_p, _ = _partials(generator("bn-threads"), 3000, 8, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _ops().ext_batch_norm_finalize(cnt, mean_p, m2_p, None)
        torch.set_num_threads(max(2, threads))
        many = _ops().ext_batch_norm_finalize(cnt, mean_p, m2_p, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])

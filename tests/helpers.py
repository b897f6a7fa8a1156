"""Shared test utilities: fresh seeds, float64 references, tolerances, poisoning."""
from __future__ import annotations

import hashlib
import os
import random

import torch

# A fresh seed per test session (printed on failure); FASTCONV_TEST_SEED=<n> replays one.
SESSION_SEED = int(os.environ.get("FASTCONV_TEST_SEED") or random.SystemRandom().randrange(2**31))

TOL = {
    torch.float64: 1e-10,
    torch.float32: 2e-4,  # tf32 is off in tests (torch's CPU default); fp32 accumulation order differs
    torch.float16: 6e-3,
    # bf16 has 8 mantissa bits; the interpreter's fp32->bf16 store truncates (1 ulp = 2**-7 relative)
    # instead of rounding, so allow two ulps of the output scale.
    torch.bfloat16: 2.5e-2,
}


def _stable_seed(*salt) -> int:
    """A seed from SESSION_SEED and the salt that is the same in every process (str hashes are not:
    PYTHONHASHSEED randomises them), so FASTCONV_TEST_SEED=<n> replays a failure exactly."""
    digest = hashlib.sha256(repr((SESSION_SEED,) + salt).encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def rng(*salt) -> random.Random:
    return random.Random(_stable_seed(*salt))


def generator(*salt) -> torch.Generator:
    return torch.Generator().manual_seed(_stable_seed(*salt))


def randn(shape, dtype, device, gen, scale=1.0):
    """Normal values quantised to dtype, never all zeros."""
    t = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    return t.to(dtype).to(device)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max(1, max |e|): relative to the output scale."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.numel() == 0:
        return 0.0
    diff = (actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max().item()
    return diff / max(1.0, expected.detach().double().abs().max().item())


def assert_close(actual, expected, dtype, what: str, config=None) -> None:
    assert torch.isfinite(actual).all() or not torch.isfinite(expected).all(), f"{what}: non-finite values {config}"
    err = rel_err(actual, expected)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:.1g} for {config} (seed {SESSION_SEED})"


def nan_alloc(shape, dtype, device, memory_format):
    """Drop-in for fastconv's output allocators: NaN-filled (integer dtypes, e.g. argmax taps: the dtype's minimum,
    never a valid value), so an element a kernel forgets shows up."""
    fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
    return torch.full(shape, fill, dtype=dtype, device=device).contiguous(memory_format=memory_format)


def nan_workspace(shape, device, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)

"""The one place where fastconv launches a Triton kernel.

Every launch goes through `run` (fixed-config kernels) or `TunedKernel` (kernels with a tile table), which:

* runs the kernel under the tensors' device (`torch.cuda.device`) and so on that device's current stream,
  whatever the current device is;
* picks the tile *before* the launch, so a launcher can size per-config buffers (BatchNorm statistics
  partials) for exactly the config that runs, and the launch plan can show it:
    - `forced(tile)`: that tile, for every tuned launch (the GPU tile sweep);
    - FASTCONV_AUTOTUNE=0 and the launch plan: `heuristic_pick`, no benchmarking;
    - the interpreter: the small configs.INTERPRET tile (test shapes cross its tile boundaries);
    - otherwise (GPU): autotune over the table — each candidate timed on the real arguments with
      triton.testing.do_bench, candidates in heuristic order, at most FASTCONV_AUTOTUNE_BUDGET_MS per key —
      with keys bucketed (pixel counts rounded up to a power of two and capped at BUCKET_CAP, so a new batch
      size or the last short batch of an epoch mostly reuses the tuned tiles) and results kept in memory and in a JSON file per device and
      Triton version under ~/.cache/fastconv/autotune (FASTCONV_CACHE_DIR). fastconv tunes itself rather
      than through triton.autotune because the config must be known before the launch (see above);
      Triton's own `cache_results` is thereby not needed.
* with FASTCONV_INTERPRET_AUTOTUNE=1 under the interpreter, does what the GPU autotuner does: runs every
  tile of the tables it could tune over (sm_80 and sm_90, this launch's operand kind and fused-or-plain
  list) once, in sequence, on the same arguments and buffers, then the final call with the picked tile, so
  any state a config leaves behind for the next is caught on CPU;
* while `recording()` is active, records the launch (kernel, tile, grid, serial loop, FLOPs, bytes) instead
  of running it: the launch plan (fastconv.launch_plan) is built from the launchers themselves.

A layer's call is replayed from C++ after its first call (replay.py), which this module
lets watch that first call's launches (`_capture`).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import json
import math
import os
import time

import torch
import triton

from .._backend import env_flag, getenv
from . import configs as cfgs
from ._common import cdiv, interpreting, next_pow2

Tile = tuple[int, int, int, int, int]

# Simulated SM count where no GPU tells it (interpreter, launch plan): H100 / H200 SXM have 132.
DEFAULT_SMS = 132


def device_index(device: torch.device) -> int:
    """The index of a CUDA device (torch.device("cuda") means the current one)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def sm_count(device: torch.device | None = None) -> int:
    """Streaming multiprocessors the grids are sized for: FASTCONV_SM_COUNT if set (tests simulate several GPUs),
    else the CUDA device's count, else DEFAULT_SMS."""
    env = getenv("FASTCONV_SM_COUNT")
    if env:
        return max(1, int(env))
    if device is not None and device.type == "cuda":
        return _cuda_sms(device_index(device))
    return DEFAULT_SMS


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def autotune_enabled() -> bool:
    return env_flag("FASTCONV_AUTOTUNE", True)


def interpret_autotune() -> bool:
    return env_flag("FASTCONV_INTERPRET_AUTOTUNE", False)


_forced: contextvars.ContextVar[Tile | None] = contextvars.ContextVar("fastconv_forced_tile", default=None)


@contextlib.contextmanager
def forced(tile: Tile):
    """Every tuned launch inside runs on exactly this (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tile."""
    token = _forced.set(tuple(int(v) for v in tile))
    try:
        yield
    finally:
        _forced.reset(token)


# ---------------------------------------------------------------------------------------------------------
# the launch plan recorder


@dataclasses.dataclass
class Launch:
    """One kernel launch as the plan sees it. `loop` is the longest serial loop one program runs (iterations);
    `gemm_loop` marks it as a GEMM's own K loop (each iteration a tile of MMA work, not a latency chain)."""
    kernel: str
    tile: Tile | None
    grid: tuple[int, ...]
    loop: int
    gemm_loop: bool
    flops: float
    bytes: float
    key: str | None = None  # the autotune key of a tuned launch (one tuning run per distinct key and process)

    @property
    def programs(self) -> int:
        return math.prod(self.grid)


_recorder: contextvars.ContextVar[list | None] = contextvars.ContextVar("fastconv_launch_recorder", default=None)


@contextlib.contextmanager
def recording():
    """Record launches instead of running them (yields the list they are appended to)."""
    from .. import _backend

    launches: list[Launch] = []
    token = _recorder.set(launches)
    with _backend.planning_mode():
        try:
            yield launches
        finally:
            _recorder.reset(token)


class _Discard(list):
    def append(self, item):
        pass


@contextlib.contextmanager
def dry_run():
    """Launches do everything but launch (host-overhead benchmarks on machines without a GPU): tiles are chosen
    as for the launch plan, buffers allocated, nothing recorded."""
    from .. import _backend

    token = _recorder.set(_Discard())
    with _backend.planning_mode():
        try:
            yield
        finally:
            _recorder.reset(token)


def tensor_bytes(*tensors) -> float:
    """Compulsory traffic of a kernel: each distinct tensor it touches, moved once."""
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return float(total)


def _record(kernel, tile, grid, loop, gemm_loop, flops, args, kwargs, key=None) -> None:
    tensors = [a for a in args if isinstance(a, torch.Tensor)] + [v for v in kwargs.values()
                                                                    if isinstance(v, torch.Tensor)]
    _recorder.get().append(Launch(getattr(kernel, "fn", kernel).__name__, tile,
                                  tuple(int(g) for g in grid), int(loop), gemm_loop, float(flops),
                                  tensor_bytes(*tensors), key))


_NO_GUARD = contextlib.nullcontext()


def device_guard(device: torch.device):
    """Triton launches on the current device's current stream: make the tensors' device current. Only when it
    is not current already: entering and leaving torch.cuda.device costs a few us of host time per launch."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return _NO_GUARD


# ---------------------------------------------------------------------------------------------------------
# the launch itself: Triton's path once per specialization, then direct


def direct_enabled() -> bool:
    """FASTCONV_DIRECT_LAUNCH (default on): repeat launches call the compiled kernel directly (see _Direct)."""
    return env_flag("FASTCONV_DIRECT_LAUNCH", True)


# Launches per path in this process (tests): "direct" (the compiled kernel called by fastconv), "triton"
# (kernel[grid](...): a first launch of its key, a hook set, no key), "replay" (a layer call replayed in C++,
# replay.py; not counted in a dry run).
LAUNCHES = {"direct": 0, "triton": 0, "replay": 0}
DIRECT_CAP = 1024  # keys kept per kernel; past it the kernel's keys are dropped and relearned


class _Direct:
    """The compiled kernels one @triton.jit function has launched, for calling them directly.

    `kernel[grid](*args, **kwargs)` binds the arguments and computes Triton's specialization (types, 16-byte
    alignment of pointers, ints equal to 1 or divisible by 16) one Python-level call per argument, then hashes
    it with str(options): 5-13 us of host time per launch of fastconv's 27-66 argument kernels on an AMD EPYC
    core (bench/_launch_binding.py), on each of the 1-7 launches of a layer's call. The first launch of each
    key goes through that path, which compiles or finds the kernel and returns it; later launches with the
    same key call its launcher as JITFunction.run does (`compiled.run(grid, stream, function, packed metadata,
    launch metadata, hooks, *every bound argument)`, the same convention in triton 3.6-3.8).

    The key and the bound arguments come from one C++ call (fastconv._C._triton_launch_key,
    csrc/triton_launch.h): the device, the keyword names, and per bound argument and option value (num_warps,
    num_stages, maxnreg) a tensor's dtype and pointer alignment, an int's value, a constant itself: finer than
    Triton's specialization, never coarser. Triton's own path is taken whenever a launch hook (e.g. proton's)
    or a pre-run hook is set, so what those see is unchanged (a direct launch passes no launch metadata and
    no hooks), and where the extension is missing. Triton's process-wide knobs (TRITON_DEBUG,
    instrumentation) are read at a key's first launch."""

    def __init__(self, kernel):
        self.kernel = kernel
        # (positional count, keyword names) -> (parameter names after the positional ones, {name: default} of
        # those the call leaves out, keyword names that are options), or None: Triton binds this call shape
        # (e.g. an argument is missing: it raises)
        self.bindings: dict[tuple, tuple | None] = {}
        self.compiled: dict[tuple, tuple] = {}  # key -> (launcher, function handle, packed metadata)

    def key(self, args: tuple, kwargs: dict, index: int, launch_key) -> tuple[tuple, tuple] | None:
        """(key, every bound argument in parameter order) of a launch on device `index`, or None (not keyable):
        launch_key is fastconv._C._triton_launch_key (csrc/triton_launch.h)."""
        found = launch_key(args, kwargs, self.bindings, index)
        if found is False:
            self.bindings[(len(args), tuple(kwargs))] = self._bind(len(args), tuple(kwargs))
            found = launch_key(args, kwargs, self.bindings, index)
        return found

    def _bind(self, nargs: int, kwnames: tuple):
        params = getattr(self.kernel, "params", None)  # a JITFunction's KernelParams; stand-ins have none
        if params is None or nargs > len(params):
            return None
        names = [p.name for p in params]
        defaults = {p.name: p.default for p in params[nargs:] if p.name not in kwnames}
        if any(d is inspect.Parameter.empty for d in defaults.values()):
            return None
        return tuple(names[nargs:]), defaults, tuple(k for k in kwnames if k not in names)


# id(kernel) -> its _Direct, which holds the kernel (so the id is never reused while the entry lives); an id
# is hashed in C, a JITFunction in Python (its cache key)
_DIRECT: dict[int, _Direct] = {}
_launch_key = None  # fastconv._C._triton_launch_key once looked up; False: unavailable


def _launch_key_fn():
    global _launch_key
    if _launch_key is None:
        from .. import _ext

        _launch_key = False
        if _ext.load():
            import fastconv._C as ext

            _launch_key = getattr(ext, "_triton_launch_key", False)
            if _launch_key:
                ext._triton_key_constant_types((triton.language.dtype,))  # constexpr accumulator types
    return _launch_key


_RUNTIME_KNOBS = triton.knobs.runtime


def _hooks_set(kernel) -> bool:
    """Whether a launch hook or a pre-run hook would run. Triton 3.6-3.8 keep a HookChain in
    knobs.runtime.launch_enter_hook / launch_exit_hook, set when it has calls; anything else not None is a hook
    (getattr(..., "calls", True))."""
    enter, leave = _RUNTIME_KNOBS.launch_enter_hook, _RUNTIME_KNOBS.launch_exit_hook
    return bool((enter is not None and getattr(enter, "calls", True))
                or (leave is not None and getattr(leave, "calls", True))
                or getattr(kernel, "pre_run_hooks", None))


def _direct_of(kernel) -> _Direct | None:
    """The kernel's _Direct where a launch may go direct now (switched on, no hook set, extension loaded)."""
    if _hooks_set(kernel) or not direct_enabled() or not (_launch_key or _launch_key_fn()):
        return None
    direct = _DIRECT.get(id(kernel))
    if direct is None:
        direct = _DIRECT[id(kernel)] = _Direct(kernel)
    return direct


def launch(kernel, grid: tuple, args: tuple, kwargs: dict, device: torch.device) -> None:
    """`kernel[grid](*args, **kwargs)` on `device`'s current stream, directly where it can (see _Direct)."""
    with device_guard(device):
        direct = _direct_of(kernel) if device.type == "cuda" else None
        if direct is None:
            LAUNCHES["triton"] += 1
            kernel[grid](*args, **kwargs)
            return
        index = device_index(device)
        keyed = direct.key(args, kwargs, index, _launch_key)
        key = None
        if keyed is not None:
            key, full = keyed
            hit = direct.compiled.get(key)
            if hit is not None:
                LAUNCHES["direct"] += 1
                run_, function, metadata = hit
                g1 = grid[1] if len(grid) > 1 else 1
                g2 = grid[2] if len(grid) > 2 else 1
                run_(grid[0], g1, g2, _current_stream(index), function, metadata, None, None, None, *full)
                return
        LAUNCHES["triton"] += 1
        compiled = kernel[grid](*args, **kwargs)
        if key is not None and compiled is not None:
            if len(direct.compiled) >= DIRECT_CAP:
                direct.compiled.clear()
            direct.compiled[key] = (compiled.run, compiled.function, compiled.packed_metadata)


def _dry_launch(kernel, args: tuple, kwargs: dict) -> None:
    """A dry run's launch (host-overhead benchmarks): the host work of a direct launch up to the launcher call
    (hooks checked, key computed and looked up), which is what a repeated launch costs fastconv on a GPU; no
    kernel runs and nothing is kept."""
    direct = _direct_of(kernel)
    if direct is not None:
        keyed = direct.key(args, kwargs, 0, _launch_key)
        if keyed is not None:
            direct.compiled.get(keyed[0])


def _current_stream(index: int) -> int:
    return torch._C._cuda_getCurrentRawStream(index)


def run(kernel, grid, *args, device: torch.device, loop: int = 1, flops: float = 0.0, **kwargs) -> None:
    """Launch a fixed-config kernel (`kernel[grid](*args, **kwargs)`) under its device, or record it."""
    grid = tuple(grid)
    rec = _recorder.get()
    if rec is not None and not isinstance(rec, _Discard):
        _record(kernel, None, grid, loop, False, flops, args, kwargs)
        return
    _go(kernel, grid, args, kwargs, device, rec)


# The launches of a call that a Replay (fastconv/triton/replay.py) is learning: (kernel, grid, args, kwargs,
# device, dry) each, None where the call autotuned (_mark_tuning).
_capture: contextvars.ContextVar[list | None] = contextvars.ContextVar("fastconv_launch_capture", default=None)


def _mark_tuning() -> None:
    """A capturing Replay's call autotunes: the candidates' launches are not the call's (a None in the capture)."""
    cap = _capture.get()
    if cap is not None:
        cap.append(None)


def _go(kernel, grid: tuple, args: tuple, kwargs: dict, device: torch.device, rec) -> None:
    """A launch (rec None) or, in a dry run (rec the dry run's recorder), its host work; a capturing Replay sees
    it."""
    cap = _capture.get()
    if cap is not None:
        cap.append((kernel, grid, args, kwargs, device, rec is not None))
    if rec is None:
        launch(kernel, grid, args, kwargs, device)
    else:
        _dry_launch(kernel, args, kwargs)


# ---------------------------------------------------------------------------------------------------------
# tile choice


@dataclasses.dataclass(frozen=True)
class Problem:
    """A launch's GEMM as the tile choice sees it: grid = cdiv(m, BM) * cdiv(n, BN) * batch programs, each
    running a K loop of taps * cdiv(k_per_tap, BK) steps."""
    m: int
    n: int
    k_per_tap: int
    taps: int = 1
    batch: int = 1
    # > 0: split-K. k_per_tap is then the whole reduction, cut per tile into split_k(...) chunks (one more grid
    # axis) so that the grid reaches split_fill programs (one wave: sm_count); 0: no split.
    split_fill: int = 0

    def splits(self, tile: Tile) -> tuple[int, int]:
        """(splits, reduction length per split) on this tile."""
        if not self.split_fill:
            return 1, self.k_per_tap
        return split_k(self.k_per_tap, cdiv(self.m, tile[0]) * cdiv(self.n, tile[1]) * self.batch, self.split_fill)

    def programs(self, tile: Tile) -> int:
        return cdiv(self.m, tile[0]) * cdiv(self.n, tile[1]) * self.batch * self.splits(tile)[0]

    def k_steps(self, tile: Tile) -> int:
        return self.taps * cdiv(self.splits(tile)[1], tile[2])

    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k_per_tap * self.taps * self.batch


# Split-K: chunks are whole multiples of the largest BLOCK_K (a K block never straddles two splits), at least
# SPLIT_K_MIN long (each program streams real work), at most SPLIT_K_MAX of them.
SPLIT_K_ALIGN, SPLIT_K_MIN, SPLIT_K_MAX = 64, 256, 64


def split_k(K: int, tiles: int, fill: int) -> tuple[int, int]:
    """(splits, chunk length) of a K-long reduction over a grid of `tiles` output tiles: the fewest splits for
    which tiles * splits >= fill (one wave), within the bounds above."""
    want = max(1, min(cdiv(fill, max(tiles, 1)), K // SPLIT_K_MIN, SPLIT_K_MAX))
    chunk = max(SPLIT_K_ALIGN, (K // want) // SPLIT_K_ALIGN * SPLIT_K_ALIGN)  # rounded down: >= want splits
    if cdiv(K, chunk) > SPLIT_K_MAX:
        chunk = cdiv(cdiv(K, want), SPLIT_K_ALIGN) * SPLIT_K_ALIGN
    return cdiv(K, chunk), chunk


def estimated_cost(tile: Tile, p: Problem, sms: int) -> float:
    """Relative time of a problem on a tile, for `heuristic_pick`: waves of programs (programs resident per SM:
    2 for tiles up to 64x128, else 1) times each program's padded MMA work divided by the tile's efficiency,
    which grows with its arithmetic intensity BM*BN/(BM+BN) up to 128x128's (data reuse per loaded byte)."""
    bm, bn, bk, _, _ = tile
    resident = 2 if bm * bn <= 64 * 128 else 1
    waves = cdiv(p.programs(tile), sms * resident)
    work = bm * bn * p.k_steps(tile) * bk
    efficiency = min(1.0, (bm * bn / (bm + bn)) / 64.0)
    return waves * work / efficiency


def heuristic_pick(tiles: list[Tile], p: Problem, sms: int) -> Tile:
    """The documented FASTCONV_AUTOTUNE=0 choice: the tile of lowest estimated_cost (first in table order on
    ties)."""
    return min(tiles, key=lambda t: (estimated_cost(t, p, sms), tiles.index(t)))


# Pixel counts from here on share one autotune bucket: 2**17 GEMM rows are >= 1,024 row tiles even of the
# largest tile, several waves on any GPU, where the best tile no longer depends on the row count.
BUCKET_CAP = 2**17


def bucket(v: int) -> int:
    """Autotune key bucket of a size: pixel-sized dims (>= 4096) round up to a power of two, capped at
    BUCKET_CAP."""
    return min(next_pow2(v), BUCKET_CAP) if v >= 4096 else v


def _meta(tile: Tile, maxnreg: int | None = None) -> dict:
    bm, bn, bk, warps, stages = tile
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}
    if maxnreg is not None and not interpreting():
        meta["maxnreg"] = maxnreg
    return meta


class _DiskCache:
    """Tuned tiles per key, persisted as JSON per (device name, Triton version)."""

    def __init__(self):
        self._entries: dict[str, dict] = {}

    def path(self, device: torch.device) -> str:
        root = os.environ.get("FASTCONV_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fastconv")
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        safe = "".join(c if c.isalnum() else "_" for c in name)
        return os.path.join(root, "autotune", f"{safe}-triton{triton.__version__}.json")

    def _load(self, path: str) -> dict:
        if path not in self._entries:
            try:
                with open(path) as f:
                    self._entries[path] = json.load(f)
            except (OSError, ValueError):
                self._entries[path] = {}
        return self._entries[path]

    def get(self, device, key: str) -> Tile | None:
        tile = self._load(self.path(device)).get(key)
        return tuple(tile) if tile is not None else None

    def put(self, device, key: str, tile: Tile) -> None:
        path = self.path(device)
        entries = self._load(path)
        entries[key] = list(tile)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(entries, f, indent=0, sort_keys=True)
            os.replace(tmp, path)
        except OSError:
            pass  # an unwritable cache costs a retune in the next process, nothing else


CACHE = _DiskCache()
# How many times each tuned key was benchmarked in this process (tests; the launch plan counts keys itself).
TUNING_RUNS: dict[str, int] = {}


def _bench_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=5, rep=20))


def _scratch_kwargs(scratch, meta: dict) -> dict:
    """A tuned launch's per-call keyword arguments: TunedKernel's `scratch` as a dict, or called on the tile."""
    if scratch is None:
        return {}
    return scratch if type(scratch) is dict else scratch(meta)


_MEMO_IDS: dict[tuple, int] = {}


def memo_id(signature: tuple) -> int:
    """A small int standing for a launch's (device, dtype, Problem, constexprs) tuple, equal for equal tuples:
    the TunedKernel memo key a launch plan stores (an int hashes in C; the tuple's Problem hashes in Python)."""
    found = _MEMO_IDS.get(signature)
    if found is None:
        found = _MEMO_IDS[signature] = len(_MEMO_IDS)
    return found


class TunedKernel:
    """A @triton.jit kernel with a tile table (configs.CONFIGS[family]); see the module doc for how the tile is
    chosen. Call it with grid(meta) -> grid tuple, the positional args, the constexpr kwargs, and
    problem: Problem (the GEMM the heuristic and the plan see), device, and optionally
    scratch(meta) -> dict of per-config keyword arguments (buffers whose size depends on the tile) or a dict of
    per-call keyword arguments that do not depend on it.
    Returns (meta, scratch kwargs) of the launch that ran (or was recorded)."""

    def __init__(self, kernel, family: str):
        self.kernel = kernel
        self.family = family
        # (autotune on/off, signature) -> (tile, meta): the per-call fast path. The signature is the caller's
        # `memo` (one launcher call signature, see conv2d's launch plans) or (device, dtype, problem,
        # constexprs).
        self._memo: dict[tuple, tuple[Tile, dict]] = {}

    def candidates(self, arch: str, kind: str, fused: bool, prologue: bool = False) -> list[tuple[Tile, int | None]]:
        return cfgs.tiles(self.family, arch, kind, fused, prologue)

    def __call__(self, grid, *args, problem: Problem, device: torch.device, scratch=None, memo=None, fixed=None,
                 **consts):
        """memo: optional stand-in for (device, args[0].dtype, problem, consts) that the caller worked out once
        per call signature with `memo_id` (saves building and hashing that tuple, whose Problem hashes in
        Python, on every launch). fixed: optional dict the caller keeps per call signature (its launch plan),
        where the launch's grid and keyword arguments (constexprs and tile) are kept once its tile is known, so
        that a repeated launch neither calls grid(meta) nor merges them again. A memo alone cannot key them: it
        stands for the Problem, and problems of different geometries (e.g. a 3x3 conv and a grouped 1x3 one) can
        share a Problem but not a grid."""
        rec = _recorder.get()
        if _forced.get() is None and (rec is None or isinstance(rec, _Discard)) and not interpreting():
            tuned = autotune_enabled()
            memo = (tuned, memo if memo is not None else (device, args[0].dtype, problem, *consts.items()))
            hit = self._memo.get(memo)
            if hit is None:
                tile, maxnreg = self._choose(self._launcher(grid, args, problem, device, scratch, consts),
                                             args[0].dtype, problem, device, consts)
                hit = self._memo[memo] = (tile, _meta(tile, maxnreg))
            if fixed is None:
                return self._launch(hit[0], hit[1], grid, args, problem, device, scratch, consts)
            meta = hit[1]
            launch_ = fixed.get(tuned)
            if launch_ is None:
                launch_ = fixed[tuned] = (tuple(grid(meta)), {**consts, **meta})
            extra = _scratch_kwargs(scratch, meta)
            kwargs = {**launch_[1], **extra} if extra else launch_[1]
            _go(self.kernel, launch_[0], args, kwargs, device, rec)
            return meta, extra
        launcher = self._launcher(grid, args, problem, device, scratch, consts)
        return launcher(*self._choose(launcher, args[0].dtype, problem, device, consts))

    def _launcher(self, grid, args, problem, device, scratch, consts):
        def launch(tile: Tile, maxnreg: int | None = None):
            return self._launch(tile, _meta(tile, maxnreg), grid, args, problem, device, scratch, consts)
        return launch

    def _launch(self, tile: Tile, meta: dict, grid, args, problem: Problem, device, scratch, consts):
        """Launch (or record, or in a dry run skip) on `tile`; returns (meta, scratch kwargs)."""
        extra = _scratch_kwargs(scratch, meta)
        g = tuple(grid(meta))
        rec = _recorder.get()
        if rec is not None and not isinstance(rec, _Discard):
            kind = cfgs.operand_kind(args[0].dtype, consts.get("PRECISION", "ieee"))
            _record(self.kernel, tile, g, problem.k_steps(tile), True, problem.flops(),
                    args, {**consts, **extra}, self._key(kind, cfgs.is_fused(consts), problem, consts))
        else:
            _go(self.kernel, g, args, {**consts, **extra, **meta}, device, rec)
        return meta, extra

    def _choose(self, launch, dtype: torch.dtype, problem: Problem, device: torch.device, consts: dict):
        """(tile, pinned registers) for this launch; see the module doc."""
        kind = cfgs.operand_kind(dtype, consts.get("PRECISION", "ieee"))
        fused = cfgs.is_fused(consts)
        prologue = bool(consts.get("PROLOGUE"))
        arch = cfgs.arch_key(device if device.type == "cuda" else None)
        tile = _forced.get()
        if tile is not None:
            return tile, cfgs.pin(self.family, kind, arch, tile, prologue)
        sms = sm_count(device)
        table = self.candidates(arch, kind, fused, prologue)
        tiles = [t for t, _ in table]
        pins = dict(table)
        if interpreting() and _recorder.get() is None:
            if not interpret_autotune():
                return cfgs.INTERPRET[self.family], None
            self._emulate_autotune(launch, kind, fused, prologue)
            tile = heuristic_pick(tiles, problem, sms)
        elif _recorder.get() is not None or not autotune_enabled():
            tile = heuristic_pick(tiles, problem, sms)
        else:
            key = self._key(kind, fused, problem, consts)
            tile = CACHE.get(device, key)
            if tile is None or tile not in pins:
                tile = self._tune(launch, tiles, pins, problem, sms, key)
                CACHE.put(device, key, tile)
        return tile, pins[tile]

    def _emulate_autotune(self, launch, kind: str, fused: bool, prologue: bool = False) -> None:
        """Run every tile the GPU autotuner could try for this launch (both architectures' tables), once each,
        on the real arguments and buffers; tiles differing only in warps/stages run once (the interpreter
        ignores both)."""
        _mark_tuning()
        seen = set()
        for arch in ("sm_80", "sm_90"):
            for tile, _ in self.candidates(arch, kind, fused, prologue):
                if tile[:3] not in seen:
                    seen.add(tile[:3])
                    launch(tile)

    def _key(self, kind: str, fused: bool, problem: Problem, consts: dict) -> str:
        flags = ",".join(f"{k}={consts[k]}" for k in sorted(consts))
        dims = (bucket(problem.m), problem.n, problem.k_per_tap, problem.taps, problem.batch)
        return f"{self.family}|{kind}|{int(fused)}|{flags}|{dims}"

    def _tune(self, launch, tiles, pins, problem: Problem, sms: int, key: str) -> Tile:
        TUNING_RUNS[key] = TUNING_RUNS.get(key, 0) + 1
        _mark_tuning()
        budget_s = float(os.environ.get("FASTCONV_AUTOTUNE_BUDGET_MS", "3000")) / 1e3
        start = time.perf_counter()
        best, best_ms = None, float("inf")
        for tile in sorted(tiles, key=lambda t: estimated_cost(t, problem, sms)):
            try:
                ms = _bench_ms(lambda: launch(tile, pins[tile]))
            except Exception:  # e.g. out of shared memory on this part: not a candidate here
                continue
            if ms < best_ms:
                best, best_ms = tile, ms
            if time.perf_counter() - start > budget_s:
                break
        return best if best is not None else heuristic_pick(tiles, problem, sms)

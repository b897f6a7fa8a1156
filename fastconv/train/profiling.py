"""--profile DIR: torch.profiler over a few training steps (schedule: wait, warm-up, active), a trace per
process in DIR (Chrome trace JSON, `*.pt.trace.json`: open it in https://ui.perfetto.dev or with
`tensorboard --logdir DIR`), and the top operators printed and saved to DIR/top_ops_rank<rank>.txt. fastconv's
custom ops show up under their own names (fastconv::conv2d, fastconv::conv_bn_act_train, ...), and the
training loop marks its forward, backward and optimizer step with record_function ranges."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.autograd.profiler_util import EventList
from torch.profiler import (
    ProfilerActivity,
    profile,
    schedule,
    tensorboard_trace_handler,
)


@contextlib.contextmanager
def profiler(out_dir: str | Path | None, *, wait: int, warmup: int, active: int, device: torch.device,
             rank: int = 0, row_limit: int = 25):
    """Yields a profiler whose .step() the loop calls after every training step (None without out_dir)."""
    if out_dir is None:
        yield None
        return
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities, schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1),
                   on_trace_ready=tensorboard_trace_handler(str(out_dir), worker_name=f"rank{rank}"),
                   record_shapes=True)
    with prof:
        yield prof
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    table = averages.table(sort_by=sort_by, row_limit=row_limit)
    # fastconv's own ops and the loop's ranges, whatever their rank in the overall table.
    ours = EventList([e for e in averages if e.key.startswith("fastconv")])
    ours_table = ours.table(sort_by=sort_by.replace("self_", ""), row_limit=-1) if len(ours) else "(none)\n"
    report = (f"top operators over {active} profiled steps (trace in {out_dir}):\n{table}\n"
              f"fastconv ops and ranges:\n{ours_table}")
    (out_dir / f"top_ops_rank{rank}.txt").write_text(report)
    if rank == 0:
        print(report)

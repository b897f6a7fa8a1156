"""The training run: model, data, optimizer, the epoch loop with per-epoch evaluation, checkpoints and
metrics.json. `run(args)` is what `python -m fastconv.train` does."""
from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function
from tqdm import tqdm

from .. import models
from . import checkpoint, distributed, metrics, optim, profiling
from .cli import CUDA_GRAPH_MODES
from . import data as data_lib

AMP_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def _autocast(device: torch.device, amp: str):
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Run:
    """One training run's state; see run()."""

    def __init__(self, args: argparse.Namespace, env: distributed.Env):
        self.args, self.env, self.device = args, env, env.device
        self.out = Path(args.out) if args.out else None
        image_size = models.input_size(args.model)[1:]
        if env.is_main:
            data_lib.prepare(args.data, args.data_dir, download=args.download, seed=args.seed,
                             synthetic_sizes=(args.synthetic_train, args.synthetic_test))
        distributed.barrier(env)
        augment = {"crop_padding": args.crop_padding, "flip": args.flip, "rotation": args.rotation,
                   "color_jitter": args.color_jitter}
        self.data = data_lib.load(args.data, args.data_dir, image_size, seed=args.seed, augment=augment)
        self.train_loader, self.test_loader, self.sampler = data_lib.loaders(
            self.data, args.batch_size, env.rank, env.world_size, args.seed, args.workers,
            pin_memory=self.device.type == "cuda")
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = args.epochs * self.steps_per_epoch

        _seed(args.seed)  # the same initial weights in every process and for --fastconv / --no-fastconv
        build_kw = {"backend": args.backend} if args.fastconv else {}
        model = models.build(args.model, num_classes=len(self.data.classes), fastconv=args.fastconv, **build_kw)
        if args.channels_last is None:  # the default: channels_last on CUDA (see the CLI's help)
            args.channels_last = self.device.type == "cuda"
        memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=memory_format)
        self.memory_format = memory_format
        self.optimizer = optim.optimizer(args.optimizer, self.model, args.lr, args.momentum, args.weight_decay,
                                         args.nesterov)
        self.scheduler = optim.scheduler(args.schedule, self.optimizer, self.total_steps, self.steps_per_epoch,
                                         args.lr, args.lr_step_epochs, args.lr_gamma)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp == "fp16")
        self.criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
        wrapped: nn.Module = self.model
        if env.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = nn.parallel.DistributedDataParallel(wrapped, device_ids=ids)
        if args.compile:
            wrapped = torch.compile(wrapped, mode=None if args.compile == "default" else args.compile)
        # CUDA graphs (cudagraph trees) replay into the same output buffers: each step tells them a new one began
        self.cuda_graphs = args.compile in CUDA_GRAPH_MODES and self.device.type == "cuda"
        self.wrapped = wrapped
        _seed(args.seed + env.rank)  # dropout masks differ between processes

        self.epoch, self.epoch_step, self.step = 0, 0, 0
        self.history: dict = {"steps": [], "epochs": []}
        if args.resume:
            self._resume(args.resume)

    # -- checkpoints -----------------------------------------------------------------------------------
    def _checkpoint_path(self) -> Path:
        if self.out is None:
            raise ValueError("checkpoints need --out DIR")
        return self.out / checkpoint.FILENAME

    def _resume(self, where: str) -> None:
        path = self._checkpoint_path() if where == "auto" else Path(where)
        state = checkpoint.load(path, map_location=self.device)
        if state["model_name"] != self.args.model:
            raise ValueError(f"{path} holds a {state['model_name']!r} model, not {self.args.model!r}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.epoch_step, self.step = state["epoch"], state["epoch_step"], state["step"]
        self.history = {"steps": list(state["history"]["steps"]),
                        "epochs": [e for e in state["history"]["epochs"] if not e.get("partial")]}
        rng = state["rng"]
        checkpoint.set_rng_state(rng[self.env.rank] if len(rng) == self.env.world_size else rng[0])
        if self.env.is_main:
            print(f"resumed from {path} at epoch {self.epoch + 1}, step {self.step}", file=sys.stderr)

    def _save(self) -> None:
        rng = distributed.all_gather_objects(checkpoint.rng_state(), self.env)
        if not self.env.is_main or self.out is None:
            return
        checkpoint.save(self._checkpoint_path(), {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "epoch_step": self.epoch_step, "step": self.step, "rng": rng,
            "history": self.history, "model_name": self.args.model, "num_classes": len(self.data.classes),
            "class_names": list(self.data.classes), "input_size": list(models.input_size(self.args.model)),
            "normalization": {"mean": list(self.data.mean), "std": list(self.data.std)},
            "args": {k: v for k, v in vars(self.args).items()},
        })

    # -- loops -----------------------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return self.wrapped(x)

    def _train_epoch(self, stop_at: int, prof) -> dict:
        """Train from self.epoch_step to the end of the epoch or global step `stop_at`."""
        args, device = self.args, self.device
        self.wrapped.train()
        self.sampler.set_epoch(self.epoch)
        self.sampler.start = self.epoch_step * args.batch_size
        self.data.train.epoch = self.epoch
        losses, correct, seen = [], [], 0
        bar = tqdm(total=self.steps_per_epoch, initial=self.epoch_step, desc=f"epoch {self.epoch + 1}/{args.epochs}",
                   disable=not self.env.is_main or args.no_progress, dynamic_ncols=True, file=sys.stderr)
        _sync(device)
        start = time.perf_counter()
        for x, y in self.train_loader:
            if self.step >= stop_at:
                break
            x = x.to(device, non_blocking=True, memory_format=self.memory_format)
            y = y.to(device, non_blocking=True)
            with record_function("fastconv.train.forward"), _autocast(device, args.amp):
                logits = self._forward(x)
                loss = self.criterion(logits, y)
            with record_function("fastconv.train.backward"):
                self.scaler.scale(loss).backward()
            with record_function("fastconv.train.optimizer_step"):
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
            losses.append(loss.detach().float())
            correct.append((logits.detach().argmax(1) == y).sum())
            seen += y.numel()
            self.step += 1
            self.epoch_step += 1
            if prof is not None:
                prof.step()
            bar.update(1)
            if self.env.is_main and not args.no_progress and (self.step % args.log_interval == 0):
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=f"{losses[-1].item():.4f}",
                                acc=f"{float(sum(correct[-args.log_interval:])) / (len(correct[-args.log_interval:]) * args.batch_size):.3f}",
                                img_s=f"{seen * self.env.world_size / max(elapsed, 1e-9):.0f}")
        _sync(device)
        seconds = time.perf_counter() - start
        bar.close()
        # One all-reduce for the whole epoch: the per-step losses (mean over processes) and correct counts.
        n = len(losses)
        packed = torch.stack(losses + [torch.stack(correct).sum().float() if correct else torch.zeros((), device=device),
                                       torch.tensor(float(seen), device=device)]) if n else torch.zeros(2, device=device)
        distributed.all_reduce_sum(packed, self.env)
        step_losses = (packed[:n] / self.env.world_size).tolist()
        first = self.step - n
        lr = self.scheduler.get_last_lr()[0]
        self.history["steps"] += [{"step": first + i + 1, "epoch": self.epoch + 1, "loss": v} for i, v in enumerate(step_losses)]
        total_seen = float(packed[n + 1]) if n else 0.0
        return {"images": total_seen, "correct": float(packed[n]) if n else 0.0, "seconds": seconds, "lr": lr}

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.wrapped.eval()
        classes = len(self.data.classes)
        matrix = torch.zeros(classes, classes, dtype=torch.long, device=self.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for x, y in self.test_loader:
            x = x.to(self.device, non_blocking=True, memory_format=self.memory_format)
            y = y.to(self.device, non_blocking=True)
            with record_function("fastconv.train.eval_forward"), _autocast(self.device, self.args.amp):
                logits = self._forward(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
            matrix += metrics.confusion_matrix(y, logits.argmax(1), classes)
        distributed.all_reduce_sum(matrix, self.env)
        distributed.all_reduce_sum(loss_sum, self.env)
        total = int(matrix.sum())
        return {"matrix": matrix.cpu(), "test_loss": float(loss_sum) / max(total, 1),
                "test_accuracy": metrics.accuracy(matrix.cpu())}

    def fit(self) -> dict:
        args = self.args
        stop_at = self.total_steps if args.max_steps is None else min(self.total_steps, args.max_steps)
        if args.profile:
            stop_at = min(stop_at, self.step + args.profile_wait + args.profile_warmup + args.profile_active)
        if self.out is not None and self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        result = None
        with profiling.profiler(args.profile, wait=args.profile_wait, warmup=args.profile_warmup,
                                active=args.profile_active, device=self.device, rank=self.env.rank) as prof:
            while self.epoch < args.epochs and self.step < stop_at:
                train = self._train_epoch(stop_at, prof)
                partial = self.epoch_step < self.steps_per_epoch
                result = self.evaluate()
                losses = [s["loss"] for s in self.history["steps"] if s["epoch"] == self.epoch + 1]
                record = {"epoch": self.epoch + 1, "steps": self.epoch_step, "train_loss": sum(losses) / max(len(losses), 1),
                          "train_accuracy": train["correct"] / max(train["images"], 1),
                          "test_loss": result["test_loss"], "test_accuracy": result["test_accuracy"],
                          "images_per_second": train["images"] / max(train["seconds"], 1e-9),
                          "seconds": train["seconds"], "lr": train["lr"]}
                if partial:
                    record["partial"] = True
                self.history["epochs"].append(record)
                if self.env.is_main:
                    print(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}, train acc "
                          f"{record['train_accuracy']:.3f}, test loss {record['test_loss']:.4f}, test acc "
                          f"{record['test_accuracy']:.3f}, {record['images_per_second']:.0f} img/s", file=sys.stderr)
                if not partial:
                    self.epoch, self.epoch_step = self.epoch + 1, 0
                self._save()
        if result is None:  # nothing left to train (resumed a finished run): just evaluate
            result = self.evaluate()
        return self._metrics(result)

    def _metrics(self, result: dict) -> dict:
        args, matrix = self.args, result["matrix"]
        epochs = self.history["epochs"]
        out = {
            "model": args.model, "fastconv": args.fastconv, "backend": args.backend if args.fastconv else None,
            "data": args.data, "classes": list(self.data.classes), "epochs_completed": self.epoch,
            "steps": self.step, "train_loss": [s["loss"] for s in self.history["steps"]],
            "epochs": epochs, "test_accuracy": result["test_accuracy"], "test_loss": result["test_loss"],
            "per_class": metrics.per_class(matrix, list(self.data.classes)),
            "confusion_matrix": matrix.tolist(),
            "images_per_second": epochs[-1]["images_per_second"] if epochs else None,
            "device": metrics.device_name(self.device), "world_size": self.env.world_size,
            "amp": args.amp, "channels_last": args.channels_last, "compile": args.compile,
            "versions": metrics.versions(), "args": {k: v for k, v in vars(args).items()},
        }
        if self.env.is_main and self.out is not None:
            metrics.write(self.out / "metrics.json", out)
        return out


def run(args: argparse.Namespace) -> dict:
    """Train as `args` says; returns the metrics (also written to OUT/metrics.json by rank 0)."""
    env = distributed.setup(args.device)
    try:
        return Run(args, env).fit()
    finally:
        distributed.cleanup(env)

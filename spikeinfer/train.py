"""The training loop every training command shares: data order, resumable state, DDP, logging.

Determinism and resumption: the batches of epoch e are `bucket_batches(..., shuffle=True,
seed=seed + e)`, rank r of w takes every w-th of them, and global step s is batch s mod
steps_per_epoch of epoch s div steps_per_epoch. The state file holds the step, the model,
optimizer and scheduler states and the torch RNG state, written atomically every `save_every`
steps, so a killed run resumed with `--resume` replays exactly the steps it had not finished.

Weight averaging (`ema_decay` > 0): an exponential moving average of the trainable parameters,
    avg <- d_t * avg + (1 - d_t) * p   after every optimizer step, d_t = min(d, (1 + t) / (10 + t)),
(Polyak averaging with TensorFlow's step-dependent ramp, so a short stage is not pinned to its
initial weights). Evaluations run on the averaged weights, the module holds them when the loop
returns, and the state file keeps both, so resuming replays the same averages.

Distributed: under `torchrun` (RANK / WORLD_SIZE set) the process group is initialised with gloo on
CPU and nccl on CUDA, the trainable module is wrapped in DistributedDataParallel, and only rank 0
writes files and prints.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

STATE_NAME = "train_state.pt"


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Initialise torch.distributed when launched by torchrun; a no-op otherwise."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(info.local_rank)
    return info


def atomic_torch_save(obj, path: Path):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def epoch_batches(lengths, batch_size: int, seed: int, epoch: int, info: DistInfo):
    from .data import bucket_batches

    batches = bucket_batches(lengths, batch_size, shuffle=True, seed=seed + epoch)
    per_rank = len(batches) // info.world
    if per_rank == 0:
        raise ValueError(f"{len(batches)} batches cannot be split over {info.world} processes")
    return batches[info.rank :: info.world][:per_rank]


class ParameterAverage:
    """Exponential moving average of a module's trainable parameters (see the module docstring).

    For 1-bit projections the averaged tensors are the latent weights, so a sign that flips
    back and forth at a high learning rate settles on the side it spends most steps on."""

    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay, self.updates = decay, 0
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.averages = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self):
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.averages, [p.detach() for p in self.params], 1.0 - d)

    @torch.no_grad()
    def _exchange(self):
        # copy_ (not .data) bumps each parameter's version, which invalidates the packed-sign
        # caches keyed by it.
        for p, a in zip(self.params, self.averages, strict=True):
            held = p.detach().clone()
            p.copy_(a)
            a.copy_(held)

    @contextmanager
    def swapped_in(self):
        """The averaged weights in the module for the block, the trained ones afterwards."""
        self._exchange()
        try:
            yield
        finally:
            self._exchange()

    @torch.no_grad()
    def copy_to_module(self):
        for p, a in zip(self.params, self.averages, strict=True):
            p.copy_(a)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "averages": self.averages}

    def load_state_dict(self, state: dict):
        if len(state["averages"]) != len(self.averages):
            raise ValueError(
                f"the saved average has {len(state['averages'])} tensors, this module "
                f"{len(self.averages)} trainable ones: resume with the flags the run started with"
            )
        self.decay, self.updates = state["decay"], state["updates"]
        for a, saved in zip(self.averages, state["averages"], strict=True):
            a.copy_(saved)


def linear_warmup_schedule(optimizer, total_steps: int, warmup_fraction: float):
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class JsonLog:
    """One JSON object per line, to stdout and to `<out>/log.jsonl` (rank 0 only)."""

    def __init__(self, out: Path, enabled: bool):
        self.path, self.enabled = out / "log.jsonl", enabled
        if enabled:
            out.mkdir(parents=True, exist_ok=True)

    def __call__(self, **record):
        if not self.enabled:
            return
        line = json.dumps(record)
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def run_loop(
    *,
    out: Path,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    step_fn: Callable[[list[int], int], dict],
    lengths,
    batch_size: int,
    total_steps: int,
    seed: int,
    info: DistInfo,
    resume: bool,
    save_every: int = 200,
    eval_fn: Callable[[int], dict] | None = None,
    eval_every: int = 0,
    desc: str = "train",
    log: JsonLog | None = None,
    ema_decay: float = 0.0,
) -> dict | None:
    """Run `step_fn(batch_indices, step) -> {"loss": float, ...}` for `total_steps` steps.

    `step_fn` computes the loss and calls backward; this loop zeroes gradients, steps the
    optimizer and scheduler, checkpoints and evaluates. Returns the last evaluation's result
    (None when no evaluation ran, e.g. a resumed run that had already finished). With
    `ema_decay` > 0, evaluations see the averaged weights and the module ends holding them.
    """
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_NAME
    step = 0
    average = ParameterAverage(module, ema_decay) if ema_decay else None
    if resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if (average is None) != (state.get("ema") is None):
            raise ValueError(
                f"{state_path} was written {'with' if state.get('ema') else 'without'} weight "
                f"averaging and this run asks for ema_decay={ema_decay}: resume with the flags "
                "the run started with (--ema), or start a new --out"
            )
        module.load_state_dict(state["module"])
        if average is not None:
            average.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        step = state["step"]
        if log:
            log(event="resume", stage=desc, step=step)
    elif resume and info.main:
        print(f"--resume: no {state_path} yet, starting from step 0", file=sys.stderr)
    steps_per_epoch = len(epoch_batches(lengths, batch_size, seed, 0, info))

    def save():
        if info.main:
            atomic_torch_save(
                {
                    "module": module.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state(),
                    "step": step,
                    "ema": average.state_dict() if average is not None else None,
                },
                state_path,
            )

    bar = tqdm(
        total=total_steps, initial=step, desc=desc, disable=not info.main, dynamic_ncols=True
    )
    start, start_step, seen = time.perf_counter(), step, 0
    batches, batches_epoch = None, -1
    result = None
    module.train()
    while step < total_steps:
        epoch, index = divmod(step, steps_per_epoch)
        if epoch != batches_epoch:
            batches, batches_epoch = epoch_batches(lengths, batch_size, seed, epoch, info), epoch
        optimizer.zero_grad(set_to_none=True)
        metrics = step_fn(batches[index], step)
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"loss became {metrics['loss']} at step {step}; lower --lr")
        optimizer.step()
        scheduler.step()
        if average is not None:
            average.update()
        step += 1
        seen += len(batches[index]) * info.world
        rate = seen / (time.perf_counter() - start)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", ex_s=f"{rate:.1f}")
        if step % save_every == 0 or step == total_steps:
            save()
        if eval_fn and ((eval_every and step % eval_every == 0) or step == total_steps):
            with average.swapped_in() if average is not None else nullcontext():
                result = eval_fn(step)
            if log:
                log(event="eval", stage=desc, step=step, epoch=epoch, **result)
            module.train()
    bar.close()
    if average is not None:
        average.copy_to_module()
    if log and step > start_step:
        log(
            event="done",
            stage=desc,
            step=step,
            train_s=round(time.perf_counter() - start, 1),
            examples_per_s=round(rate, 2),
        )
    return result

"""The processes of a multi-device run of the generation loop, and how they agree.

A recipe launched with ``--trainer.devices 2 --trainer.strategy ddp`` (or by ``torchrun`` / SLURM,
which start the processes themselves) runs the whole generation loop in every process. Lightning
would only start the other processes at the first ``trainer.fit``, after the loop has already
looked at the run directory; :func:`launch` starts them (and the process group) up front instead,
so every decision the loop takes (which generation is next, which of its steps are already staged)
is taken by global rank 0 and broadcast, and every later ``Trainer`` finds the processes and the
group already there.

The rules the loop follows with it:

- only rank 0 writes to the run directory (config, store, metrics, W&B), except the chunk files of
  the synthetic set, which each rank writes for the chunks it draws;
- rank 0's steps run inside :meth:`Dist.on_zero`, which broadcasts their result or their error, so
  a failure on rank 0 stops every rank with the same message instead of leaving them waiting;
- all processes see the run directory through one shared file system (a laptop, one node, or a
  cluster's shared storage).

Strategies that spawn processes from inside the script (``ddp_spawn``, ``ddp_notebook``) cannot
work this way and are refused; ``ddp`` (the default for several devices), FSDP and the rest of the
script-relaunching strategies are fine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist

from collapse.errors import UserError

T = TypeVar("T")

LAUNCH_KEYS = ("accelerator", "devices", "num_nodes", "strategy")
"""The Trainer settings that decide how many processes a run has."""


class Dist:
    """Rank, world size and the few collectives the loop needs; trivial in a single process."""

    @property
    def active(self) -> bool:
        """Whether this is one of several processes in an initialised process group."""
        return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1

    @property
    def rank(self) -> int:
        return torch_dist.get_rank() if self.active else 0

    @property
    def world_size(self) -> int:
        return torch_dist.get_world_size() if self.active else 1

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj if self.is_zero else None]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_zero(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and return its result on every rank; rank 0's error is raised on all."""
        if not self.active:
            return fn()
        outcome: tuple[str, Any] = ("ok", None)
        error: BaseException | None = None
        if self.is_zero:
            try:
                outcome = ("ok", fn())
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others know
                error = exc
                outcome = ("error", (type(exc).__name__, str(exc), isinstance(exc, UserError)))
        kind, value = self.broadcast(outcome)
        if error is not None:
            raise error
        if kind == "error":
            name, message, user = value
            raise (UserError(message) if user else RuntimeError(f"rank 0 failed: {name}: {message}"))
        return value


def wants_processes(trainer_kwargs: Mapping[str, Any]) -> int:
    """How many processes the Trainer settings ask for (devices x nodes), resolving ``auto`` and ``-1``."""
    import lightning.pytorch as pl

    kwargs = {k: trainer_kwargs[k] for k in LAUNCH_KEYS if k in trainer_kwargs}
    try:
        probe = pl.Trainer(**kwargs, logger=False, enable_progress_bar=False, enable_model_summary=False)
    except Exception as exc:  # noqa: BLE001 - Lightning's MisconfigurationException & co. name the bad setting
        raise UserError(f"--trainer settings {kwargs} are not usable here: {exc}".replace("\n", " ")) from None
    return int(probe.world_size)


def launch(trainer_kwargs: Mapping[str, Any]) -> Dist:
    """Start the run's processes and their process group now, if the Trainer settings ask for several.

    In the process the user started, this re-runs the same command once per extra device (the
    ``ddp`` launcher's way); in those processes, or under ``torchrun``/SLURM, it joins the group.
    """
    processes = wants_processes(trainer_kwargs)
    if processes <= 1 or (torch_dist.is_available() and torch_dist.is_initialized()):
        return Dist()
    strategy = trainer_kwargs.get("strategy", "auto")
    if isinstance(strategy, str) and ("spawn" in strategy or "notebook" in strategy or "fork" in strategy):
        raise UserError(
            f"--trainer.strategy {strategy} starts processes from inside the script; use ddp "
            f"(the recipe re-launches itself once per device) or launch with torchrun"
        )
    from lightning.fabric import Fabric

    fabric = Fabric(
        accelerator=trainer_kwargs.get("accelerator", "auto"),
        devices=trainer_kwargs.get("devices", "auto"),
        num_nodes=trainer_kwargs.get("num_nodes", 1),
        strategy="ddp",  # only to start the processes and the group; the Trainer's strategy reuses them
    )
    fabric.launch()
    if torch.cuda.is_available() and fabric.device.type == "cuda":
        torch.cuda.set_device(fabric.device)
    return Dist()


__all__ = ["Dist", "LAUNCH_KEYS", "launch", "wants_processes"]

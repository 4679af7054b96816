"""Weights & Biases logging, offline unless the user opts in.

One W&B run per recipe run, grouped by recipe (``--wandb.group`` to change it) with the workflow as
the job type and ``workflow=...``/``seed=...`` tags, so that workflows and seeds compare in one view
(group the runs table by job type, or filter by tag).
``mode``: ``offline`` (default; writes ``<out_dir>/wandb/offline-run-*``, upload later with
``wandb sync``), ``online`` (opt in; needs ``wandb login``) or ``disabled``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collapse.errors import UserError

MODES = ("offline", "online", "disabled")


@dataclass
class WandbConfig:
    """W&B settings."""

    mode: str = "offline"
    """offline (default: logs to <out_dir>/wandb, sync later), online (opt in), or disabled."""
    project: str = "model-collapse"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user); default: your default entity."""
    group: str | None = None
    """W&B group; default: the recipe name, so all runs of a recipe compare in one view."""


def check_mode(cfg: WandbConfig) -> None:
    """Refuse an unknown --wandb.mode, or online mode without W&B credentials, before anything is written."""
    if cfg.mode not in MODES:
        raise UserError(f"--wandb.mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    if cfg.mode == "online" and not has_credentials():
        raise UserError(
            "--wandb.mode online needs W&B credentials: run 'wandb login' (or set WANDB_API_KEY), "
            "or log offline (--wandb.mode offline, the default) and upload later with 'wandb sync'"
        )


def has_credentials() -> bool:
    """Whether W&B can find an API key: ``WANDB_API_KEY``, or an entry for its host in the netrc file ``wandb login``
    writes (``$NETRC`` or ``~/.netrc``; the host from ``WANDB_BASE_URL``, default api.wandb.ai)."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC") or None).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class Tracker:
    """A thin wrapper around one ``wandb`` run; every method is a no-op when disabled."""

    def __init__(self, cfg: WandbConfig, recipe: str, out_dir: str | Path, config: dict[str, Any]):
        check_mode(cfg)
        self.run = None
        if cfg.mode == "disabled":
            return
        import wandb  # imported lazily: it is slow and optional at run time

        out = Path(out_dir)
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            self.run = self._init(wandb, cfg, recipe, out, config)
        except UserError:
            raise
        except Exception as exc:  # wandb raises its own types (network, auth, settings) as tracebacks
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(
                f"W&B could not start a {cfg.mode} run ({type(exc).__name__}: {first}); "
                "use --wandb.mode offline or disabled, or fix the W&B settings"
            ) from None
        self.run.define_metric("generation")
        self.run.define_metric("*", step_metric="generation")

    @staticmethod
    def _init(wandb: Any, cfg: WandbConfig, recipe: str, out: Path, config: dict[str, Any]) -> Any:
        return wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group or recipe,
            job_type=str(config.get("workflow", recipe)),
            tags=[recipe, *(f"{key}={config[key]}" for key in ("workflow", "seed") if key in config)],
            name=out.name,
            dir=str(out),
            config=config,
            mode=cfg.mode,
            resume="allow",
            id=_run_id(out),
            reinit="finish_previous",
        )

    def log(self, metrics: dict[str, float], generation: int) -> None:
        """Log scalar metrics of one generation."""
        if self.run is not None:
            self.run.log({"generation": generation, **metrics})

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def log_texts(self, key: str, texts: list[str], generation: int | None = None) -> None:
        """Log texts (e.g. sample stories) as a table with one row per text."""
        if self.run is not None:
            import wandb

            rows = [[generation, i, t] for i, t in enumerate(texts)]
            payload: dict[str, Any] = {key: wandb.Table(columns=["generation", "index", "text"], data=rows)}
            if generation is not None:
                payload["generation"] = generation
            self.run.log(payload)

    def log_image(self, key: str, path: str | Path, generation: int | None = None) -> None:
        if self.run is not None:
            import wandb

            payload: dict[str, Any] = {key: wandb.Image(str(path))}
            if generation is not None:
                payload["generation"] = generation
            self.run.log(payload)

    def save_file(self, path: str | Path) -> None:
        """Attach a file of the run directory (e.g. metrics.csv) to the W&B run."""
        if self.run is not None:
            path = Path(path)
            self.run.save(str(path), base_path=str(path.parent), policy="now")

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def _run_id(out: Path) -> str:
    """A stable run id per run directory, so a resumed run continues the same W&B run."""
    import hashlib

    return hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:12]

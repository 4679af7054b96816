"""Weights & Biases logging, offline unless the user opts in.

One W&B run per recipe run, grouped by recipe (``--wandb.group`` to change it) with the workflow as
the job type and ``workflow=...``/``seed=...`` tags, so that workflows and seeds compare in one view
(group the runs table by job type, or filter by tag). Each generation's metrics are one row on the
``generation`` axis, under the names metrics.json and metrics.csv use (``test_loss``, ``mean_sq_error``);
the fits' training curves (``train_loss``, learning rate, throughput) go to the same run, on the
``trainer/step`` axis, with ``generation`` as a column (:meth:`Tracker.log_training`).

A recipe run made of parts that each log the same metrics (the cells of an analytic recipe's grid) opens one
W&B run per part instead (``Tracker(..., part=...)``): named by the part, grouped by the run directory's name,
so that the parts of one experiment overlay metric by metric.
``mode``: ``offline`` (default; writes ``<out_dir>/wandb/offline-run-*``, upload later with
``wandb sync``), ``online`` (opt in; needs ``wandb login``) or ``disabled``.

W&B's environment variables are honoured where the flag is not given: ``WANDB_MODE``, ``WANDB_PROJECT``,
``WANDB_ENTITY``, ``WANDB_NAME``, ``WANDB_RUN_GROUP`` (or ``WANDB_GROUP``) and ``WANDB_TAGS``
(comma-separated, added to the run's own tags); a flag, on the command line or in a config file, wins.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collapse.errors import UserError, first_line

log = logging.getLogger(__name__)

MODES = ("offline", "online", "disabled")
DEFAULT_MODE = "offline"
DEFAULT_PROJECT = "model-collapse"
_MODE_ALIASES = {"dryrun": "offline", "run": "online"}
"""Older WANDB_MODE values that W&B still accepts."""
TRAIN_STEP = "trainer/step"
"""The x axis of the training curves: optimizer steps since the start of this process's first fit."""


@dataclass
class WandbConfig:
    """W&B settings (each flag left unset takes W&B's environment variable, e.g. WANDB_MODE, if it is set)."""

    mode: str | None = None
    """offline (logs to <out_dir>/wandb, sync later), online (opt in), or disabled; default: $WANDB_MODE, else
    offline."""
    project: str | None = None
    """W&B project; default: $WANDB_PROJECT, else model-collapse."""
    entity: str | None = None
    """W&B entity (team or user); default: $WANDB_ENTITY, else your default entity."""
    group: str | None = None
    """W&B group; default: $WANDB_RUN_GROUP (or $WANDB_GROUP), else the recipe name, so all runs of a recipe
    compare in one view."""
    name: str | None = None
    """W&B run name; default: $WANDB_NAME, else the run directory's name."""
    tags: list[str] | None = None
    """Extra W&B tags (besides the recipe, workflow=... and seed=...); default: $WANDB_TAGS (comma-separated)."""


MAX_TAG = 64
"""The longest tag W&B accepts (characters)."""


def resolve(cfg: WandbConfig, environ: Mapping[str, str] | None = None) -> WandbConfig:
    """``cfg`` with every unset setting taken from W&B's environment variables, then from the defaults."""
    env = os.environ if environ is None else environ

    def pick(value: Any, *keys: str) -> Any:
        if value is not None:
            return value
        for key in keys:
            if env.get(key, "").strip():
                return env[key].strip()
        return None

    mode = pick(cfg.mode, "WANDB_MODE") or DEFAULT_MODE
    tags = cfg.tags
    if tags is None and env.get("WANDB_TAGS", "").strip():
        tags = [t.strip() for t in env["WANDB_TAGS"].split(",") if t.strip()]
    return dataclasses.replace(
        cfg,
        mode=_MODE_ALIASES.get(mode, mode),
        project=pick(cfg.project, "WANDB_PROJECT") or DEFAULT_PROJECT,
        entity=pick(cfg.entity, "WANDB_ENTITY"),
        group=pick(cfg.group, "WANDB_RUN_GROUP", "WANDB_GROUP"),
        name=pick(cfg.name, "WANDB_NAME"),
        tags=list(tags) if tags is not None else None,
    )


def check_mode(cfg: WandbConfig) -> None:
    """Refuse an unknown --wandb.mode, a tag W&B would refuse, or online mode without W&B credentials, before
    anything is written.

    Every process of a multi-process run checks for itself (they share the environment), so none starts on
    settings that rank 0 would refuse.
    """
    mode = resolve(cfg).mode
    if mode not in MODES:
        source = "--wandb.mode" if cfg.mode is not None else "WANDB_MODE"
        raise UserError(f"{source} must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "disabled" and "WANDB_MODE" in os.environ and not os.environ["WANDB_MODE"].strip():
        raise UserError(
            "WANDB_MODE is set but empty, which W&B refuses whatever --wandb.mode says; unset it or set it to "
            f"one of {', '.join(MODES)}"
        )
    for tag in (resolve(cfg).tags or []) if mode != "disabled" else []:  # no W&B run: its tags do not matter
        if not isinstance(tag, str) or not tag.strip() or len(tag) > MAX_TAG:
            source = "--wandb.tags" if cfg.tags is not None else "WANDB_TAGS"
            raise UserError(f"{source}: a W&B tag must be 1 to {MAX_TAG} characters, got {tag!r}")
    if mode == "online" and not has_credentials():
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
    """A thin wrapper around one ``wandb`` run; every method is a no-op when disabled.

    ``config`` is the run's config (config.yaml's contents). ``part`` names one part of the recipe run that has a
    W&B run of its own, e.g. the grid cell ``replace dim=1 n_samples=10``: that W&B run is named by it (after
    ``--wandb.name`` if given), grouped by ``--wandb.group``, else by the run directory's name (the parts of one
    run side by side), and has an id of its own (stable, so a resumed run continues it).
    """

    def __init__(
        self, cfg: WandbConfig, recipe: str, out_dir: str | Path, config: dict[str, Any], part: str | None = None
    ):
        check_mode(cfg)
        cfg = resolve(cfg)
        self.run = None
        self._train_keys: set[str] = set()
        self._step_base = 0  # trainer/step of this process's fits so far
        if cfg.mode == "disabled":
            return
        import wandb  # imported lazily: it is slow and optional at run time

        out = Path(out_dir)
        os.environ.setdefault("WANDB_SILENT", "true")
        # WANDB_TAGS is read into cfg.tags (empty entries dropped); W&B would read it again, and refuse ",,".
        hidden_tags = os.environ.pop("WANDB_TAGS", None)
        try:
            self.run = self._init(wandb, cfg, recipe, out, config, part)
        except UserError:
            raise
        except Exception as exc:  # wandb raises its own types (network, auth, settings) as tracebacks
            other = "offline or disabled" if cfg.mode == "online" else "disabled"
            raise UserError(
                f"W&B could not start an {cfg.mode} run ({first_line(exc)}); fix the W&B settings (--wandb.* "
                f"flags, WANDB_* variables), or use --wandb.mode {other}"
            ) from None
        finally:
            if hidden_tags is not None:
                os.environ["WANDB_TAGS"] = hidden_tags
        self.run.define_metric("generation")
        self.run.define_metric(TRAIN_STEP)
        self.run.define_metric("*", step_metric="generation")

    @staticmethod
    def _init(wandb: Any, cfg: WandbConfig, recipe: str, out: Path, config: dict[str, Any], part: str | None) -> Any:
        if part is None:
            group, name = cfg.group or recipe, cfg.name or out.name
        else:
            group, name = cfg.group or out.name, f"{cfg.name} {part}" if cfg.name else part
        return wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            group=group,
            job_type=str(config.get("workflow", recipe)),
            tags=[
                recipe,
                *(f"{key}={config[key]}"[:MAX_TAG] for key in ("workflow", "seed") if key in config),
                *(cfg.tags or []),
            ],
            name=name,
            dir=str(out),
            config=config,
            mode=cfg.mode,
            resume="allow",
            id=_run_id(out, part),
            reinit="finish_previous",
        )

    def log(self, metrics: dict[str, float], generation: int) -> None:
        """Log scalar metrics of one generation."""
        if self.run is not None:
            self.run.log({"generation": generation, **metrics})

    def log_training(self, metrics: Mapping[str, float], generation: int, step: int) -> None:
        """Log one row of a fit's curves (train loss, learning rate, ...) at optimizer step ``step`` of ``generation``.

        Plotted against ``trainer/step``, which keeps counting across the generations of this process, so the
        fits follow one another; ``trainer/global_step`` is the step within the generation.
        """
        if self.run is None:
            return
        for key in metrics:
            if key not in self._train_keys:
                self.run.define_metric(key, step_metric=TRAIN_STEP)
                self._train_keys.add(key)
        self.run.log(
            {**metrics, "generation": generation, "trainer/global_step": step, TRAIN_STEP: self._step_base + step}
        )

    def end_fit(self, steps: int) -> None:
        """A fit of ``steps`` optimizer steps ended: the next one's curves start after it on ``trainer/step``."""
        self._step_base += max(0, int(steps))

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

    def finish(self, failed: bool = False) -> None:
        """End the W&B run; ``failed``: the recipe run is ending with an error, which W&B's own must not hide.

        A failed run is marked so in W&B (exit code 1). Should W&B fail too (the disk that refused the run's
        file refuses W&B's), its error is dropped and the logging module stops printing handler errors for the
        rest of the process: with a full disk W&B's log handlers fail on every line, and each report of that,
        written to the standard error that W&B still captures, would start another (thousands of tracebacks).
        """
        if self.run is None:
            return
        run, self.run = self.run, None
        if not failed:
            run.finish()
            return
        before, logging.raiseExceptions = logging.raiseExceptions, False
        try:
            run.finish(exit_code=1)
        except Exception as exc:  # noqa: BLE001 - the run's own error is on its way up
            log.debug("W&B could not finish the run: %s", first_line(exc))
            return
        logging.raiseExceptions = before


def _run_id(out: Path, part: str | None = None) -> str:
    """A stable run id per run directory (and part of it), so a resumed run continues the same W&B run."""
    import hashlib

    key = str(out.resolve()) if part is None else f"{out.resolve()}\n{part}"
    return hashlib.sha1(key.encode()).hexdigest()[:12]

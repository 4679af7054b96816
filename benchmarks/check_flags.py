"""Parse benchmark and recipe command lines without running them, so a script's flags cannot go stale.

Reads ``FILE``, one command a line: a name, a tab, then the command as the shell would run it
(``python benchmarks/lm_training.py --device cuda ...`` or ``python recipes/tinystories.py ...``). Each is
parsed by its own parser in this process: a benchmark's ``parse_args(argv)`` (with CUDA reported as
present, so ``--device cuda`` parses on a CPU machine), then its ``--preset`` checked against the
presets; a recipe's config dataclass through :func:`collapse.cli.parse_config`, its checks included.
Nothing is trained, sampled or written. Prints ``NAME: flags ok`` or ``NAME: flags FAILED (...)`` per
command; the exit status is 1 when any failed.

    python benchmarks/check_flags.py commands.tsv     # as benchmarks/gpu_check.sh's dry mode runs it
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import shlex
import sys
from pathlib import Path
from types import ModuleType
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def load(script: Path) -> ModuleType:
    """The module of ``script`` (a path under the repository), imported without running its ``__main__`` block."""
    relative = script.resolve().relative_to(ROOT)
    if relative.parts[0] == "recipes":
        return importlib.import_module(".".join(relative.with_suffix("").parts))
    spec = importlib.util.spec_from_file_location(f"_checked_{relative.stem}", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (and pickling) look a class's module up by name
    spec.loader.exec_module(module)
    return module


def check_benchmark(module: ModuleType, argv: list[str]) -> None:
    """Parse ``argv`` with the benchmark's ``parse_args``; an unknown ``--preset`` fails too."""
    import torch

    from lit_modules.causal_lm import PRESETS

    with mock.patch.object(torch.cuda, "is_available", return_value=True):
        args = module.parse_args(argv)
    preset = getattr(args, "preset", None)
    known = {**PRESETS, **getattr(module, "BENCH_PRESETS", {})}
    if preset is not None and preset not in known:
        raise ValueError(f"--preset {preset!r} is not one of {sorted(known)}")
    if hasattr(args, "device"):
        torch.device(args.device)  # a malformed device string fails here


def check_recipe(module: ModuleType, argv: list[str]) -> None:
    """Parse ``argv`` into the recipe's config dataclass (:func:`collapse.cli.recipe_config_class`)."""
    from collapse.cli import parse_config, recipe_config_class

    config = recipe_config_class(module)
    if config is None:
        raise ValueError(f"cannot tell the config class of {module.__name__}")
    parse_config(config, argv)


def check(tokens: list[str]) -> None:
    """Parse one command line (``python SCRIPT ARGS...``); raises on a flag its parser rejects."""
    script = Path(tokens[1])
    if not script.is_absolute():
        script = ROOT / script
    module = load(script)
    argv = tokens[2:]
    if script.resolve().parent.name == "recipes":
        check_recipe(module, argv)
    else:
        check_benchmark(module, argv)


def main(argv: list[str] | None = None) -> int:
    [listing] = sys.argv[1:] if argv is None else argv
    failed = 0
    for line in Path(listing).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        name, command = line.split("\t", 1)
        said = io.StringIO()  # what a parser writes before it exits: its reason
        try:
            with contextlib.redirect_stderr(said):
                check(shlex.split(command))
        except (Exception, SystemExit) as exc:  # argparse and jsonargparse exit on a bad flag
            failed += 1
            reason = (said.getvalue().strip().splitlines() or [""])[-1] if isinstance(exc, SystemExit) else str(exc)
            print(f"{name}: flags FAILED ({type(exc).__name__}: {reason.strip()}) in: {command}", flush=True)
        else:
            print(f"{name}: flags ok", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

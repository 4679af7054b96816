"""Typed command lines for the recipes, built with jsonargparse from a config dataclass.

Every field of the dataclass becomes a flag documented by the field's docstring (``--help``);
nested dataclasses become dotted flags (``--wandb.mode``); ``--config file.yaml`` and
``--print_config`` come for free. Bad input ends with one ``error:`` line and exit status 2,
never a traceback.

The habits of other command lines hold: a run's own ``config.yaml`` is a valid ``--config`` (its
``recipe`` key is read past); flags are never abbreviated (``--generation`` is not ``--generations``);
a boolean flag alone means true (``--dry_run``); ``None``, ``none`` and ``null`` are all null where a
flag may be empty (``--real_size=None``, as ``wandb agent`` writes it). Objects described by
``class_path``/``init_args`` (Trainer callbacks, loggers, ...) stay descriptions in the config, so
config.yaml records them; the code that uses them builds them.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import re
import signal
import sys
import threading
import time
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from collapse.errors import Terminated, UserError, disk_full_line, path_name_error
from collapse.hardware import retain_freed_memory, tf32_matmuls

C = TypeVar("C")

RUN_ONLY_KEYS = ("recipe",)
"""Keys a run's config.yaml holds beside the flags; read past when the file is given back with ``--config``."""
NULLS = ("None", "none", "null", "Null", "NULL", "~")
"""Values that mean null for a flag that may be empty."""


def _one_line(message: str) -> str:
    key = re.search(r'Parser key "([^"]+)"', message)
    given = re.search(r"(?:Given|Got) value: (.*)", message)
    if key and given:
        return f"--{key.group(1)}: invalid value {given.group(1).strip()!r}"
    # Drop list bullets ("- ...") that jsonargparse puts before sub-errors, but keep "--flag".
    lines = [re.sub(r"^\s*-\s+", "", line).strip() for line in str(message).splitlines()]
    lines = [line for line in lines if line]
    return "; ".join(lines)


def build_parser(config_cls: type, prog: str | None = None, description: str | None = None):
    """A jsonargparse parser with one flag per field of ``config_cls``."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # --help shows each field's docstring

    class _Parser(ArgumentParser):
        def error(self, message: str, ex: Exception | None = None):  # noqa: D401 - jsonargparse hook
            # jsonargparse's type errors span several lines; keep the first useful ones on one line.
            sys.stderr.write(f"error: {_one_line(message)} (see --help)\n")
            sys.exit(2)

    parser = _Parser(
        prog=prog,
        description=description or (config_cls.__doc__ or "").strip(),
        exit_on_error=True,
        allow_abbrev=False,  # --generation must not silently mean --generations
    )
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file of flags (as --print_config writes).")
    parser.add_class_arguments(config_cls, fail_untyped=True, sub_configs=True)
    return parser


def parse_config(config_cls: type[C], argv: Sequence[str] | None = None, prog: str | None = None) -> C:
    """Parse ``argv`` (default: ``sys.argv[1:]``) into an instance of the dataclass ``config_cls``."""
    parser = build_parser(config_cls, prog=prog)
    argv = _habits(parser, list(sys.argv[1:] if argv is None else argv), _recipe_of(config_cls))
    ns = parser.parse_args(argv)
    return _instance(config_cls, ns.as_dict())


def _instance(cls: type[C], values: dict[str, Any], prefix: str = "--") -> C:
    """``cls`` built from parsed ``values``: nested dataclasses built in turn, ``class_path`` descriptions kept.

    A group of flags given as something other than a mapping (``data: 5`` in a ``--config`` file) is refused.
    """
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not f.init or f.name not in values:
            continue
        value = values[f.name]
        hint = hints.get(f.name)
        if value is None and not _admits_none(hint):  # jsonargparse checks this on the command line, not in files
            raise UserError(f"{prefix}{f.name} cannot be empty (null); give it a value or leave it out for its default")
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise UserError(
                    f"{prefix}{f.name} is a group of flags ({prefix}{f.name}.<field>); in a --config file it "
                    f"must be a mapping of its fields, not {value!r}"
                )
            value = _instance(hint, value, prefix=f"{prefix}{f.name}.")
        kwargs[f.name] = value
    return cls(**kwargs)


def _admits_none(hint: Any) -> bool:
    """Whether a field of type ``hint`` may hold None (``X | None``, ``Optional[X]``, ``Any``, no hint)."""
    if hint is None or hint is Any or hint is type(None):
        return True
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return None in typing.get_args(hint)
    return origin in (typing.Union, types.UnionType) and any(_admits_none(arg) for arg in typing.get_args(hint))


def recipe_config_class(module: Any) -> type | None:
    """The config dataclass of a recipe module: the one ``...Config`` dataclass defined there with an ``out_dir``
    (None when there is not exactly one)."""
    found = [
        value
        for name, value in vars(module).items()
        if name.endswith("Config") and isinstance(value, type) and dataclasses.is_dataclass(value)
        and value.__module__ == module.__name__ and "out_dir" in {f.name for f in dataclasses.fields(value)}
    ]  # fmt: skip
    return found[0] if len(found) == 1 else None


def _recipe_of(config_cls: type) -> str | None:
    """The recipe whose settings ``config_cls`` holds: the name of its file in ``recipes/`` (None elsewhere)."""
    module = sys.modules.get(config_cls.__module__)
    path = Path(getattr(module, "__file__", None) or "")
    return path.stem if path.parent.name == "recipes" and path.suffix == ".py" else None


def _habits(parser: Any, argv: list[str], recipe: str | None = None) -> list[str]:
    """``argv`` with the usual command-line habits made explicit for jsonargparse.

    A bare boolean flag gets ``true``; ``None``/``none`` for a flag that may be empty becomes ``null``; a
    ``--config`` file that is a run's config.yaml is passed without its :data:`RUN_ONLY_KEYS` (and refused when
    it is another ``recipe``'s run).
    """
    hints = {}
    for action in parser._actions:  # jsonargparse keeps each flag's type hint on its action
        for option in action.option_strings:
            hints[option] = getattr(action, "_typehint", None)
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        flag, eq, value = token.partition("=")
        following = argv[i + 1] if i + 1 < len(argv) else None
        if flag == "--config":
            if eq:
                out.append(f"--config={_config_text(value, recipe)}")
            else:
                out.append(token)
                if following is not None:
                    out.append(_config_text(following, recipe))
                    i += 1
            i += 1
            continue
        hint = hints.get(flag) if flag.startswith("--") else None
        if hint is not None and not eq:
            if following is None or (following.startswith("--") and following != "--"):
                if _allows(hint, bool):
                    out.extend([flag, "true"])
                    i += 1
                    continue
            elif following in NULLS and _allows(hint, type(None)):
                out.extend([flag, "null"])
                i += 2
                continue
        elif hint is not None and value in NULLS and _allows(hint, type(None)):
            token = f"{flag}=null"
        out.append(token)
        i += 1
    return out


def _allows(hint: Any, kind: type) -> bool:
    """Whether the type hint ``hint`` admits values of type ``kind`` (bool, NoneType)."""
    if hint is kind:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_allows(arg, kind) for arg in typing.get_args(hint))
    return False


def _config_text(value: str, recipe: str | None = None) -> str:
    """A ``--config`` value: a run's config.yaml becomes its flags alone (YAML text); anything else is unchanged.

    A file that holds no mapping of flags (empty, a list, a number) is a UserError, and so is the config.yaml of a
    run of another recipe than ``recipe``."""
    path = Path(value)
    if not path.is_file():
        return value
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise UserError(f"--config {value}: not a text (YAML) file") from None
    except OSError as exc:
        raise UserError(f"--config {value}: cannot be read ({exc.strerror or exc})") from None
    except yaml.YAMLError:
        return value  # jsonargparse reports it, with the file's name
    if not isinstance(data, dict):
        what = "empty" if data is None else f"a YAML {type(data).__name__}"
        raise UserError(f"--config {value}: {what}, not a mapping of flags (as --print_config writes)")
    if not any(key in data for key in RUN_ONLY_KEYS):
        return value
    if recipe is not None and isinstance(data.get("recipe"), str) and data["recipe"] != recipe:
        raise UserError(f"--config {value}: the config of a {data['recipe']} run, not of {recipe}")
    flags = {k: v for k, v in data.items() if k not in RUN_ONLY_KEYS}
    return yaml.safe_dump(flags, sort_keys=False)


def run(main: Callable[[C], Any], config_cls: type[C], argv: Sequence[str] | None = None, prog: str | None = None):
    """Parse the command line, call ``main(cfg)``, and turn a :class:`UserError` into one ``error:`` line.

    A Ctrl-C (KeyboardInterrupt) ends with one line saying how to resume and exit status 130; a SIGTERM that
    Lightning caught (:class:`Terminated`) likewise, with exit status 143; a write that found the disk full (or the
    quota used up) with one line naming the file, exit status 1.
    """
    try:
        cfg = parse_config(config_cls, argv, prog=prog)
        retain_freed_memory()  # large training buffers are reused instead of re-zeroed by the kernel
        tf32_matmuls()  # on a CUDA GPU: float32 matrix products on TF32 tensor cores
        return main(cfg)
    except (UserError, OSError) as exc:
        _end_other_ranks()
        full = disk_full_line(exc)
        if full is not None:  # not bad input (exit 1), but nothing a traceback would help with
            if not secondary_process():
                sys.stderr.write(f"error: {full}\n")
            sys.exit(1)
        if isinstance(exc, OSError) and (exc := path_name_error(exc)) is None:
            raise
        if not secondary_process():  # in a multi-process run every rank raises it; one line is enough
            sys.stderr.write(f"error: {_one_line(str(exc))}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        if not secondary_process():  # a Ctrl-C reaches every rank of a multi-process run; one line is enough
            sys.stderr.write("interrupted: finished work is kept; run the same command again to resume\n")
        _quiet_to_the_end()
        sys.exit(130)
    except Terminated:
        if not secondary_process():
            sys.stderr.write("terminated: finished work is kept; run the same command again to resume\n")
        _quiet_to_the_end()
        sys.exit(143)
    except Exception:
        _end_other_ranks()  # rank 0's traceback comes alone, not followed by theirs of a lost connection
        raise
    finally:
        _close_process_group()


def _end_other_ranks() -> None:
    """In rank 0 of a run that started its other ranks itself, end them now: the run is ending with an error here
    (:func:`collapse.distributed.end_started_ranks`). A no-op elsewhere, and in processes that never loaded torch."""
    distributed = sys.modules.get("collapse.distributed")
    if distributed is not None and not secondary_process():
        distributed.end_started_ranks()


def _quiet_to_the_end() -> None:
    """In a process of a run's other ranks that stopped, ignore further Ctrl-Cs while it exits.

    A terminal's Ctrl-C reaches every rank and rank 0 passes its own on as well; the one that comes after the run's
    handler is gone would interrupt the exit (``atexit`` callbacks) with a traceback. Rank 0 keeps it: a second
    Ctrl-C there still cuts a slow exit short. SIGTERM keeps its default action (no traceback), so a rank whose exit
    hangs can still be ended.
    """
    if secondary_process() and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _close_process_group() -> None:
    """Shut down this process's share of a multi-process run's process group, if there is one.

    Left to interpreter exit, the group's communication threads can still be running when C++
    static destructors run, which aborts the process ("terminate called without an active
    exception", exit status -6) after all work is done. Destroying the group first is local to the
    process (no collective), so it cannot hang.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None:
        return
    try:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - shutting down: nothing useful left to report
        pass


def secondary_process() -> bool:
    """Whether the launcher (Lightning's ddp, torchrun, SLURM) says this is not the first process of a run."""
    return any(os.environ.get(key, "0") not in ("", "0") for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """libc's ``prctl`` (Linux only), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # the symbols already loaded, libc's among them
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


def die_with_parent(parent: int) -> bool:
    """Have the kernel SIGKILL this process as soon as its parent, process ``parent``, ends; False if it cannot.

    A parent ended by ``kill -9`` has no chance to stop its children, and a child waiting for work from
    it would wait for ever. Linux only (``prctl(PR_SET_PDEATHSIG)``); elsewhere see :func:`watch_parent`.
    A parent that ended before the request took effect ends this process at once. The kernel ties the
    request to the parent *thread* that started this process, so start such children from a thread
    that outlives them (the main thread).
    """
    prctl = _prctl()
    ok = prctl is not None and prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    if os.getppid() != parent:
        os._exit(1)
    return ok


def die_with_parent_hook() -> Callable[[], bool] | None:
    """A ``preexec_fn`` for :class:`subprocess.Popen` that makes the child :func:`die_with_parent` of this process.

    None where that is not possible. libc is looked up here, in the parent, so that between fork and exec
    the child only makes the call.
    """
    if _prctl() is None:
        return None
    return functools.partial(die_with_parent, os.getpid())


def watch_parent(parent: int, interval: float = 1.0) -> threading.Thread:
    """Start a daemon thread that ends this process once its parent, process ``parent``, is gone.

    The portable stand-in for :func:`die_with_parent`: an orphan is adopted by another process, so its
    parent pid changes. Exits with ``os._exit``: with the parent gone, nothing waits for this process's work.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    thread = threading.Thread(target=watch, name="parent-watchdog", daemon=True)
    thread.start()
    return thread


def as_list(value: Any) -> list:
    """A flag that takes one value or a list of them (``--dim 10`` or ``--dim '[1, 10]'``)."""
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def positive_ints(flag: str, values: Any) -> list[int]:
    """Validate a one-or-many integer flag; every value must be > 0."""
    out = as_list(values)
    if not out:
        raise UserError(f"--{flag} is empty; give at least one positive integer")
    for v in out:
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise UserError(f"--{flag} must be positive integers, got {v!r}")
    return out


def positive_floats(flag: str, values: Any) -> list[float]:
    """Validate a one-or-many float flag; every value must be > 0."""
    out = as_list(values)
    if not out:
        raise UserError(f"--{flag} is empty; give at least one positive number")
    for v in out:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise UserError(f"--{flag} must be positive numbers, got {v!r}")
    return [float(v) for v in out]

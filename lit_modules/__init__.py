"""Lightning models, one file per model family."""


def config_with_overrides(config_cls, config, overrides, what):
    """``config`` (default: ``config_cls()``) with keyword ``overrides``; an unknown name is a ValueError.

    The dataclass's own checks run again on the result (``dataclasses.replace`` calls ``__post_init__``).
    """
    import dataclasses

    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown {what} settings {unknown}; expected some of {sorted(known)}")
    return dataclasses.replace(config or config_cls(), **overrides)

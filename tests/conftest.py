"""Shared test setup: keep every library offline and headless."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")

# As the recipes do (collapse.cli.run): reuse freed training buffers instead of re-zeroing fresh pages.
from collapse.hardware import retain_freed_memory  # noqa: E402

retain_freed_memory()

"""Children's stories for the causal LM, following the real data module contract of :mod:`datamodules.synthetic`.

Sources (``--data.source``), all ending as the same cache of cleaned texts and token arrays:

``stand_in`` (the default, offline)
    The generated corpus of :mod:`datamodules.story_corpus`: seeded, prefix-stable, and NOT TinyStories;
    everything that shows it names it :data:`~datamodules.story_corpus.STAND_IN_LABEL`.
    ``--data.stand_in_stories`` stories are generated (default: ``num_test + num_val + num_real``, with
    :data:`DEFAULT_STAND_IN_TRAIN` training stories when ``num_real`` is not set), seed ``--data.stand_in_seed``.
``hub``
    A Hugging Face dataset with a ``text`` column (``--data.text_field``) and splits ``train`` and
    ``validation`` (or ``valid`` / ``test``): a hub id (default ``roneneldan/TinyStories``, 2,119,719 /
    21,990 stories; needs network access or the local hub cache), a folder written by
    ``DatasetDict.save_to_disk`` (or ``train/`` and ``validation/`` folders written by
    ``Dataset.save_to_disk``), or a folder of parquet files in the hub layout (``train-*.parquet`` and
    ``validation-*.parquet``, directly in it or under ``data/``). Parquet files are streamed with
    pyarrow, a batch at a time, without copying them into the ``datasets`` cache.
``hub_v2``
    The GPT-4-only V2 files of the same hub repository (``--data.path``: its id, default
    ``roneneldan/TinyStories``): :data:`V2_FILES`, fetched with ``huggingface_hub.hf_hub_download`` and
    read as ``txt``.
``txt``
    The official ``.txt`` format: stories separated by lines ``<|endoftext|>``. ``--data.path`` is one
    file (a training split only: the held-out stories are carved from it, see below) or a folder
    holding exactly one ``*train*.txt`` and one ``*valid*.txt`` file (``TinyStories-train.txt`` and
    ``TinyStories-valid.txt``, or the V2 names). Files are read in 16 MiB blocks, never whole.
``jsonl``
    One JSON object per line, the story in ``--data.text_field`` (default ``text``); a file or a folder
    with one ``*train*.jsonl`` and one ``*valid*.jsonl`` file, as for ``txt``. Blank lines are skipped.
``arrow``
    A local Arrow dataset: a folder written by ``save_to_disk`` (a ``DatasetDict`` with the splits of
    ``hub``, or a single ``Dataset``: a training split only), or one ``.arrow`` file (a training split only).

Split policy. Stories are taken in file order, never shuffled (TinyStories comes shuffled), after
stripping whitespace and dropping empty ones. With a held-out split (validation file or split):
the real training set is the first ``num_real`` stories of the training split (default: all of
them); the test set is the first ``num_test`` stories of the held-out split (``None``: all of it but
the validation stories) and the validation set the ``num_val`` stories after them. Without one
(``stand_in``, a single file, a single-split dataset): the test set is stories ``[0, num_test)``,
the validation set the next ``num_val`` and the training set the ``num_real`` after those. Either
way the test set does not depend on ``num_real``, and a smaller ``num_real`` gives a prefix of a
larger one's training set (the stand-in corpus is prefix-stable, so it holds across
``stand_in_stories`` too). A ``num_real`` that is set stops the reading of the training split as
soon as it has that many stories.

The tokenizer is trained once, on exactly the real training set, and frozen: it is resolved in this
order, identically on every process: (a) ``<run_dir>/tokenizer.json`` when the module is given a
``run_dir`` holding one (a resumed run: never retrained; a corrupt or mismatched file is an error);
(b) ``tokenizer.json`` of the cache entry; (c) otherwise (only in :meth:`~TinyStoriesDataModule.prepare_data`)
a byte-level BPE is trained (:func:`~datamodules.tokenizer.train_bpe`), padded to exactly
``vocab_size`` tokens and written into the cache entry. Nothing is written into ``run_dir`` here:
the recipe copies :attr:`~TinyStoriesDataModule.tokenizer_file` there itself.

Cache layout (``--data.cache_dir``, default ``$MODEL_COLLAPSE_CACHE/tinystories`` or
``~/.cache/model-collapse/tinystories``)::

    <cache_dir>/<source>-<key>/          one entry per data identity (key: sha256 of identity.json)
        identity.json                    source, path, sizes and sha256 of local files, split sizes,
                                         text field, stand-in seed/size, vocab_size, max_seq_len, strict_utf8
        texts/stats.json                 read counts (written last: the texts are complete)
        texts/<split>/text.utf8          the cleaned stories of train / val / test, UTF-8, concatenated
        texts/<split>/offsets.npy        int64 (n + 1,): byte offsets of the stories in text.utf8
        tokenizer.json                   the BPE trained on texts/train (case (c) above)
        tokens-<tokenizer hash[:16]>/
            stats.json                   token counts and truncations (written last: tokens complete)
            <split>/tokens.npy           uint16 (total,): the stories' token ids, back to back
            <split>/offsets.npy          int64 (n + 1,): story i is tokens[offsets[i]:offsets[i + 1]]

Every file is written atomically (:mod:`collapse.atomic`) and streamed (a few thousand stories in
memory at a time), and the ``stats.json`` markers are written after the files they describe, so a
killed preparation is redone, never half-read. The source is read and tokenised once per entry;
later runs and other ranks memory-map the arrays. Local files enter the key by size and sha256, so
editing them gives a new entry (touching them does not); hub sources by their id only.

Items and padding. A story is a 1-D int64 tensor ``[EOT] + ids + [EOT]`` truncated to its first
``max_seq_len`` tokens (a truncated story has no final ``EOT``; truncations are counted and
logged). Synthetic stories (:meth:`~TinyStoriesDataModule.synthetic_dataset`) give the same items.
:func:`collate_stories` puts ONE story per row, never packing several into a row, so real and
synthetic stories are the units the workflows count and attention never crosses a story boundary;
rows are right-padded with ``PAD`` to the longest story of the batch (dynamic padding, not to
``max_seq_len``), ``attention_mask`` is 0 and ``labels`` -100 on padding, so the causal LM's
token-weighted mean loss (:mod:`lit_modules.causal_lm`) never counts it.

Bad input. Counted, logged and reported in :attr:`~TinyStoriesDataModule.data_stats`: empty
stories (dropped), undecodable bytes (each replaced by U+FFFD, unless ``--data.strict_utf8``
refuses them, naming the file and byte offset), truncated stories. Refused with a one-line
:class:`~collapse.errors.UserError` naming the file or flag: a missing file or folder, a
malformed file (no separator line in a ``.txt`` file, a bad JSON line: file and line number), a
missing or non-text column/field, a corpus with no non-empty story, fewer stories than
``num_test`` + ``num_val`` + ``num_real`` need, a damaged cache or run tokenizer.
:class:`~collapse.errors.ConfigError` for flag values out of range.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import mmap
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import Dataset

import datamodules.tokenizer as tok
from collapse.atomic import atomic_open, atomic_write_json, check_writable_folder, entry_lock, make_folder
from collapse.errors import ConfigError, UserError
from collapse.progress import Progress
from collapse.store import sha256_file
from datamodules.base import RealDataModuleBase, first_line
from datamodules.story_corpus import EOT_SEPARATOR, STAND_IN_LABEL, iter_stories
from datamodules.tokenizer import PAD_ID, TOKENIZER_FILE

log = logging.getLogger(__name__)

SOURCES = ("stand_in", "hub", "hub_v2", "txt", "jsonl", "arrow")
"""Valid values of ``--data.source``."""
DEFAULT_HUB_ID = "roneneldan/TinyStories"
"""Hub dataset of ``--data.source hub`` / ``hub_v2`` without ``--data.path``."""
V2_FILES = {"train": "TinyStoriesV2-GPT4-train.txt", "heldout": "TinyStoriesV2-GPT4-valid.txt"}
"""The GPT-4-only files of the hub repository that ``--data.source hub_v2`` reads."""
HELDOUT_SPLITS = ("validation", "valid", "test")
"""Names of a dataset's held-out split, in order of preference."""
DEFAULT_NUM_TEST = 500
"""Default number of test stories."""
DEFAULT_STAND_IN_TRAIN = 1000
"""Training stories of the stand-in corpus when neither ``num_real`` nor ``stand_in_stories`` is set."""
SPLITS = ("train", "val", "test")
"""The splits of a cache entry."""
CACHE_ENV = "MODEL_COLLAPSE_CACHE"
"""Environment variable naming the project's cache folder (default ``~/.cache/model-collapse``)."""
CACHE_VERSION = 1
"""Part of every cache key: bump it when the cache format or the cleaning rules change."""
IGNORE_INDEX = -100
"""Label of padding positions (the Hugging Face convention)."""
STATS_FILE = "stats.json"

_READ_BLOCK = 16 << 20  # bytes of a .txt file decoded at a time
_ENCODE_CHUNK = 8192  # stories encoded (and held in memory as Python lists) at a time
_ARROW_BATCH = 10_000  # rows of an Arrow / parquet dataset read at a time
_OFFSET_FLUSH = 1 << 16  # offsets buffered before they are written
# A separator line: <|endoftext|> alone on its line, up to horizontal whitespace (matches read_corpus's strip()).
_SEPARATOR = re.compile(r"^[ \t\r\f\v]*" + re.escape(EOT_SEPARATOR) + r"[ \t\r\f\v]*$", re.MULTILINE)
# Lone surrogates: what surrogateescape makes of undecodable bytes (U+DC80..U+DCFF), or what a JSON
# "\udXXX" escape without its pair gives; none can be written as UTF-8.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


DEFAULT_MAX_SEQ_LEN = 256
"""Tokens per story of a data module whose ``max_seq_len`` is not set (not tied to a model's context)."""


@dataclass
class TinyStoriesDataConfig:
    """Where the stories come from, how many of them the runs use and how they are tokenised (``--data.*``)."""

    source: str = "stand_in"
    """Data source: stand_in (generated offline, not TinyStories), hub, hub_v2, txt, jsonl or arrow."""
    path: str | None = None
    """hub: a hub id (default roneneldan/TinyStories), a save_to_disk folder or a folder of hub-layout parquet
    files; hub_v2: a hub id (default roneneldan/TinyStories); txt / jsonl: a file or a folder with *train* and
    *valid* files (required); arrow: a save_to_disk folder or a .arrow file (required); stand_in: not used."""
    text_field: str = "text"
    """jsonl, arrow, hub: the field / column holding a story."""
    num_real: int | None = None
    """Real training stories: the first num_real of the training split (default: all; stand_in: 1000)."""
    num_val: int = 0
    """Validation stories, held out like the test stories (0: no validation)."""
    num_test: int | None = DEFAULT_NUM_TEST
    """Test stories (None: the whole held-out split but the validation stories; needs a held-out split)."""
    stand_in_stories: int | None = None
    """stand_in: stories generated (default: num_test + num_val + num_real)."""
    stand_in_seed: int = 0
    """stand_in: seed of the generated corpus."""
    vocab_size: int = tok.DEFAULT_VOCAB_SIZE
    """Tokenizer vocabulary size, 258..65536 (padded with reserved tokens when the corpus gives fewer)."""
    max_seq_len: int | None = None
    """Tokens per story, both EOTs included; longer stories are truncated (and counted in data.json). None: the
    model's context (the recipe ties them: 2,048 for the published presets, 256 for the laptop ones); a data module
    built alone uses :data:`DEFAULT_MAX_SEQ_LEN`."""
    strict_utf8: bool = False
    """Refuse files with bytes that are not UTF-8 (default: replace each with U+FFFD and count them)."""
    cache_dir: str | None = None
    """Folder of the text and token cache (default: $MODEL_COLLAPSE_CACHE/tinystories or
    ~/.cache/model-collapse/tinystories)."""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"--data.source must be one of {SOURCES}, got {self.source!r}")
        if self.path is not None and not (isinstance(self.path, str) and self.path.strip()):
            raise ConfigError(f"--data.path must be a non-empty string or None, got {self.path!r}")
        if self.source in ("txt", "jsonl", "arrow") and self.path is None:
            raise ConfigError(f"--data.source {self.source} needs --data.path: the file or folder to read")
        if self.source == "stand_in" and self.path is not None:
            raise ConfigError("--data.path is not used by --data.source stand_in (it generates its stories)")
        if not (isinstance(self.text_field, str) and self.text_field):
            raise ConfigError(f"--data.text_field must be a non-empty string, got {self.text_field!r}")
        for flag in ("num_real", "num_test", "stand_in_stories"):
            value = getattr(self, flag)
            if value is not None and not (_is_int(value) and value > 0):
                raise ConfigError(f"--data.{flag} must be a positive integer or None, got {value!r}")
        for flag in ("num_val", "stand_in_seed"):
            value = getattr(self, flag)
            if not (_is_int(value) and value >= 0):
                raise ConfigError(f"--data.{flag} must be an integer >= 0, got {value!r}")
        if not (_is_int(self.vocab_size) and 258 <= self.vocab_size <= 65536):
            raise ConfigError(
                f"--data.vocab_size must be an integer in 258..65536 (256 bytes + EOT + PAD; uint16 ids), "
                f"got {self.vocab_size!r}"
            )
        if self.max_seq_len is not None and not (_is_int(self.max_seq_len) and self.max_seq_len >= 3):
            raise ConfigError(
                f"--data.max_seq_len must be an integer >= 3 (EOT, a token, EOT) or None, got {self.max_seq_len!r}"
            )
        if not isinstance(self.strict_utf8, bool):
            raise ConfigError(f"--data.strict_utf8 must be true or false, got {self.strict_utf8!r}")
        if self.cache_dir is not None and not (isinstance(self.cache_dir, str) and self.cache_dir.strip()):
            raise ConfigError(f"--data.cache_dir must be a non-empty string or None, got {self.cache_dir!r}")
        if self.source == "stand_in":
            if self.num_test is None:
                raise ConfigError("--data.num_test must be a number for --data.source stand_in (no validation split)")
            needed = self.num_test + self.num_val + (self.num_real or 1)
            if self.stand_in_stories is not None and self.stand_in_stories < needed:
                raise ConfigError(
                    f"--data.stand_in_stories {self.stand_in_stories} is less than the {needed} that --data.num_test "
                    f"+ --data.num_val + --data.num_real (at least 1) need"
                )

    def stand_in_total(self) -> int:
        """Stories of the stand-in corpus: ``stand_in_stories``, or what the split sizes need."""
        if self.stand_in_stories is not None:
            return self.stand_in_stories
        train = self.num_real if self.num_real is not None else DEFAULT_STAND_IN_TRAIN
        return (self.num_test or 0) + self.num_val + train


def default_cache_dir() -> Path:
    """The token cache: ``$MODEL_COLLAPSE_CACHE/tinystories``, else ``~/.cache/model-collapse/tinystories``."""
    env = os.environ.get(CACHE_ENV)
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "model-collapse"
    return root / "tinystories"


# ---- where the data is ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Location:
    """A resolved source: what to read, and the local files whose size and content enter the cache key."""

    kind: str  # stand_in | hub_id | hub_v2 | local_dataset | arrow_file | text_files
    spec: str = ""  # the hub id or the resolved local path
    where: str = ""  # how messages name it
    train: Path | None = None  # text_files: the training file
    heldout: Path | None = None  # text_files: the held-out file (None: carved from the training file)
    files: tuple[Path, ...] = field(default_factory=tuple)


def _looks_local(spec: str) -> bool:
    return Path(spec).is_absolute() or spec.startswith((".", "~")) or spec.count("/") > 1


def _folder_files(folder: Path) -> tuple[Path, ...]:
    """Every regular file under ``folder``, hidden ones (lock files, ...) left out, sorted."""
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            found.append(path)
    return tuple(sorted(found))


def _pick_one(folder: Path, pattern: str, flag: str) -> Path | None:
    matches = sorted(p for p in folder.glob(pattern) if p.is_file())
    if len(matches) > 1:
        names = ", ".join(p.name for p in matches)
        raise UserError(f"{flag}: several files match {pattern} ({names}); pass the one to use as --data.path")
    return matches[0] if matches else None


def _locate(cfg: TinyStoriesDataConfig) -> _Location:
    """Resolve ``cfg.source`` and ``cfg.path`` (UserError for a missing file or folder)."""
    if cfg.source == "stand_in":
        return _Location("stand_in", where="the stand-in corpus")
    if cfg.source in ("hub", "hub_v2"):
        spec = cfg.path or DEFAULT_HUB_ID
        where = f"--data.path {spec}" if cfg.path else f"hub dataset {spec}"
        local = Path(spec).expanduser()
        if cfg.source == "hub_v2":
            if local.exists() or _looks_local(spec):
                raise UserError(
                    f"{where}: --data.source hub_v2 takes a hub dataset id; read local V2 .txt files with "
                    "--data.source txt"
                )
            return _Location("hub_v2", spec, f"hub dataset {spec}")
        if local.exists():
            if not local.is_dir():
                raise UserError(f"{where}: a file; --data.source hub wants a hub id or a dataset folder")
            local = local.resolve()
            return _Location("local_dataset", str(local), where, files=_folder_files(local))
        if _looks_local(spec):
            raise UserError(f"{where}: no such directory (and not a hub id such as {DEFAULT_HUB_ID})")
        return _Location("hub_id", spec, where)
    assert cfg.path is not None
    where = f"--data.path {cfg.path}"
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise UserError(f"{where}: no such file or directory")
    path = path.resolve()
    if cfg.source == "arrow":
        if path.is_dir():
            return _Location("local_dataset", str(path), where, files=_folder_files(path))
        if path.suffix != ".arrow":
            raise UserError(f"{where}: --data.source arrow wants a save_to_disk folder or a .arrow file")
        return _Location("arrow_file", str(path), where, files=(path,))
    ext = ".txt" if cfg.source == "txt" else ".jsonl"
    if path.is_file():
        return _Location("text_files", str(path), where, train=path, files=(path,))
    train = _pick_one(path, f"*train*{ext}", where)
    heldout = _pick_one(path, f"*valid*{ext}", where)
    if train is None or heldout is None:
        missing = f"*train*{ext}" if train is None else f"*valid*{ext}"
        raise UserError(
            f"{where}: no {missing} file in the folder; pass a folder with one *train*{ext} and one *valid*{ext} "
            f"file, or a single {ext} file (the test stories are then carved from it)"
        )
    return _Location("text_files", str(path), where, train=train, heldout=heldout, files=(train, heldout))


def data_identity(cfg: TinyStoriesDataConfig, location: _Location | None = None) -> dict[str, Any]:
    """What the cache key hashes: everything that changes the cleaned texts, the tokenizer or the token arrays."""
    location = location or _locate(cfg)
    identity: dict[str, Any] = {
        "version": CACHE_VERSION,
        "source": cfg.source,
        "num_real": cfg.num_real,
        "num_val": cfg.num_val,
        "num_test": cfg.num_test,
        "vocab_size": cfg.vocab_size,
        "max_seq_len": cfg.max_seq_len,
        "strict_utf8": cfg.strict_utf8,
    }
    if cfg.source == "stand_in":
        identity.update(stand_in_stories=cfg.stand_in_total(), stand_in_seed=cfg.stand_in_seed)
        return identity
    identity["path"] = location.spec
    if cfg.source in ("hub", "jsonl", "arrow"):
        identity["text_field"] = cfg.text_field
    if location.files:
        root = Path(location.spec)
        root = root if root.is_dir() else root.parent
        identity["files"] = [[str(path.relative_to(root)), *_content_digest(path)] for path in location.files]
    return identity


_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}
"""sha256 of local data files already read by this process, by (path, size, mtime, ctime, inode)."""


def _content_digest(path: Path) -> tuple[int, str]:
    """(size, sha256) of a local data file: its content, not its modification time, enters the cache key, so an
    edit that keeps size and mtime (``touch -r``, a copy that keeps times) gives a new entry and a touch does not.
    Hashed once per process (about a second per GB)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(path)
    return st.st_size, _DIGESTS[key]


def cache_key(identity: Mapping[str, Any]) -> str:
    """The first 16 hex digits of the sha256 of ``identity`` as canonical JSON."""
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# ---- readers: each yields raw stories (not yet stripped) -----------------------------------------------------
def _decode(data: bytes, path: Path, base: int, strict: bool, counts: dict[str, int], line: int | None = None) -> str:
    """UTF-8 text of ``data`` (bytes ``base..`` of ``path``): undecodable bytes replaced and counted, or refused."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if strict:
            at = f" (line {line})" if line is not None else ""
            raise UserError(
                f"{path}: not valid UTF-8 at byte offset {base + exc.start}{at} ({exc.reason}); "
                "without --data.strict_utf8 such bytes are replaced by U+FFFD and counted"
            ) from None
    text, n = _ESCAPED_BYTE.subn("\ufffd", data.decode("utf-8", errors="surrogateescape"))
    counts["bytes_replaced"] += n
    return text


def _iter_txt(path: Path, strict: bool, counts: dict[str, int]) -> Iterator[str]:
    """Stories of a ``.txt`` file with ``<|endoftext|>`` separator lines, read a block at a time."""
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise UserError(f"{path}: cannot read the file ({first_line(exc)})") from None
    with fh:
        carry, pending, base, separators, content = "", b"", 0, 0, False
        while True:
            block = fh.read(_READ_BLOCK)
            data = pending + block
            if block:
                # Cut at the last newline: 0x0A never occurs inside a UTF-8 sequence, and lines stay whole.
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    pending = data
                    continue
                data, pending = data[:cut], data[cut:]
            text = _decode(data, path, base, strict, counts).replace("\r\n", "\n")
            base += len(data)
            parts = _SEPARATOR.split(carry + text)
            separators += len(parts) - 1
            carry = parts.pop()
            content = content or bool(text.strip())
            yield from parts
            if not block:
                break
    if content and separators == 0:
        raise UserError(f"{path}: no {EOT_SEPARATOR} separator line; not a TinyStories .txt file")
    if carry.strip():  # text after the last separator (the format ends every story with one)
        yield carry


def _iter_jsonl(path: Path, text_field: str, strict: bool, counts: dict[str, int]) -> Iterator[str]:
    """Stories of a JSON-lines file, from field ``text_field`` of each object (``null`` counts as empty)."""
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise UserError(f"{path}: cannot read the file ({first_line(exc)})") from None
    with fh:
        offset = 0
        for number, raw in enumerate(fh, 1):
            line = _decode(raw, path, offset, strict, counts, line=number)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}: line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}: line {number}: expected a JSON object, got {type(obj).__name__}")
            if text_field not in obj:
                fields = ", ".join(sorted(obj)) or "none"
                raise UserError(f"{path}: line {number}: no {text_field!r} field (--data.text_field; fields: {fields})")
            value = obj[text_field]
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise UserError(f"{path}: line {number}: field {text_field!r} is {type(value).__name__}, not text")
            if _SURROGATE.search(value):
                if strict:
                    raise UserError(f"{path}: line {number}: an unpaired \\u surrogate escape, not valid Unicode")
                value, n = _SURROGATE.subn("\ufffd", value)
                counts["bytes_replaced"] += n
            yield value


def _check_text_type(arrow_type: Any, text_field: str, where: str) -> None:
    import pyarrow as pa

    checks = [pa.types.is_string, pa.types.is_large_string, getattr(pa.types, "is_string_view", None)]
    if not any(check is not None and check(arrow_type) for check in checks):
        raise UserError(f"{where}: column {text_field!r} holds {arrow_type}, not text (--data.text_field)")


def _iter_dataset(ds: Any, text_field: str, where: str) -> Iterator[str]:
    """Stories of column ``text_field`` of a ``datasets.Dataset``, an Arrow batch at a time (nulls count as empty)."""
    if text_field not in ds.column_names:
        raise UserError(f"{where}: no {text_field!r} column (--data.text_field; columns: {', '.join(ds.column_names)})")
    table = ds.select_columns([text_field]).with_format("arrow")
    _check_text_type(ds.data.schema.field(text_field).type, text_field, where)
    for batch in table.iter(batch_size=_ARROW_BATCH):
        for value in batch.column(0).to_pylist():
            yield value if value is not None else ""


def _iter_parquet(files: Sequence[Path], text_field: str, where: str) -> Iterator[str]:
    """Stories of column ``text_field`` of parquet files, streamed a batch at a time."""
    import pyarrow.parquet as pq

    for file in files:
        try:
            pf = pq.ParquetFile(file)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise UserError(f"{file}: not a readable parquet file ({first_line(exc)})") from None
        schema = pf.schema_arrow
        if text_field not in schema.names:
            raise UserError(f"{file}: no {text_field!r} column (--data.text_field; columns: {', '.join(schema.names)})")
        _check_text_type(schema.field(text_field).type, text_field, str(file))
        batches = pf.iter_batches(batch_size=_ARROW_BATCH, columns=[text_field])
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception as exc:
                raise UserError(f"{file}: cannot read its rows ({first_line(exc)})") from None
            for value in batch.column(0).to_pylist():
                yield value if value is not None else ""


# A split to read: how messages name it, and its raw stories.
_Split = tuple[str, Iterator[str]]


def _dataset_splits(splits: Mapping[str, Any], where: str, text_field: str) -> tuple[_Split, _Split | None]:
    """``(train, held-out or None)`` of a dict of ``datasets.Dataset`` by split name."""
    if "train" not in splits:
        raise UserError(f"{where}: no train split (splits: {', '.join(sorted(splits)) or 'none'})")
    train = (f"{where} [train]", _iter_dataset(splits["train"], text_field, f"{where} [train]"))
    for name in HELDOUT_SPLITS:
        if name in splits:
            return train, (f"{where} [{name}]", _iter_dataset(splits[name], text_field, f"{where} [{name}]"))
    return train, None


def _load_from_disk(folder: Path, where: str) -> Any:
    import datasets

    try:
        return datasets.load_from_disk(str(folder))
    except Exception as exc:  # datasets / pyarrow raise many types for a damaged folder
        raise UserError(f"{where}: cannot read the saved dataset ({first_line(exc)})") from None


def _parquet_layout(folder: Path) -> tuple[Path, list[Path], list[Path]] | None:
    """``(subfolder, train files, held-out files)`` of the first hub-layout subfolder with parquet files."""
    for sub in (folder, folder / "data"):
        train = sorted(sub.glob("train-*.parquet"))
        if train:
            for name in HELDOUT_SPLITS:
                heldout = sorted(sub.glob(f"{name}-*.parquet"))
                if heldout:
                    return sub, train, heldout
            return sub, train, []
    return None


def _open_local_dataset(folder: Path, where: str, text_field: str, parquet: bool) -> tuple[_Split, _Split | None]:
    """The splits of a ``save_to_disk`` folder (a DatasetDict, a Dataset, or split subfolders) or parquet folder."""
    if (folder / "dataset_dict.json").is_file():
        return _dataset_splits(dict(_load_from_disk(folder, where)), where, text_field)
    if (folder / "state.json").is_file():
        return _dataset_splits({"train": _load_from_disk(folder, where)}, where, text_field)
    if (folder / "train" / "state.json").is_file():
        splits = {"train": _load_from_disk(folder / "train", f"{where}/train")}
        for name in HELDOUT_SPLITS:
            if (folder / name / "state.json").is_file():
                splits[name] = _load_from_disk(folder / name, f"{where}/{name}")
                break
        return _dataset_splits(splits, where, text_field)
    layout = _parquet_layout(folder) if parquet else None
    if layout is None:
        wanted = " nor a folder of train-*.parquet / validation-*.parquet files" if parquet else ""
        raise UserError(f"{where}: neither a saved dataset (dataset_dict.json or state.json){wanted}")
    sub, train_files, held_files = layout
    train = (f"{where} [train]", _iter_parquet(train_files, text_field, f"{where} [train]"))
    if not held_files:
        return train, None
    name = held_files[0].name.split("-", 1)[0]
    return train, (f"{where} [{name}]", _iter_parquet(held_files, text_field, f"{where} [{name}]"))


def _open_source(cfg: TinyStoriesDataConfig, loc: _Location, counts: dict[str, int]) -> tuple[_Split, _Split | None]:
    """``(train split, held-out split or None)`` of a resolved source; reading is lazy."""
    strict = cfg.strict_utf8
    if loc.kind == "stand_in":
        return (loc.where, iter_stories(cfg.stand_in_total(), cfg.stand_in_seed)), None
    if loc.kind == "text_files":
        assert loc.train is not None

        def read(path: Path) -> Iterator[str]:
            if cfg.source == "txt":
                return _iter_txt(path, strict, counts)
            return _iter_jsonl(path, cfg.text_field, strict, counts)

        train = (str(loc.train), read(loc.train))
        return train, ((str(loc.heldout), read(loc.heldout)) if loc.heldout is not None else None)
    if loc.kind == "hub_v2":
        import huggingface_hub

        files: dict[str, Path] = {}
        for role, name in V2_FILES.items():
            try:
                files[role] = Path(huggingface_hub.hf_hub_download(loc.spec, name, repo_type="dataset"))
            except Exception as exc:  # offline without a cached copy, unknown repo, ...
                raise UserError(
                    f"{loc.where}: cannot fetch {name} ({first_line(exc)}); pass --data.source txt with --data.path "
                    "to local copies, or use --data.source stand_in"
                ) from None
        return (
            (str(files["train"]), _iter_txt(files["train"], strict, counts)),
            (str(files["heldout"]), _iter_txt(files["heldout"], strict, counts)),
        )
    if loc.kind == "arrow_file":
        import datasets

        try:
            ds = datasets.Dataset.from_file(loc.spec)
        except Exception as exc:
            raise UserError(f"{loc.where}: not a readable .arrow file ({first_line(exc)})") from None
        return _dataset_splits({"train": ds}, loc.where, cfg.text_field)
    if loc.kind == "local_dataset":
        return _open_local_dataset(Path(loc.spec), loc.where, cfg.text_field, parquet=cfg.source == "hub")
    assert loc.kind == "hub_id"
    import datasets

    try:
        splits = dict(datasets.load_dataset(loc.spec))
    except Exception as exc:  # offline without a cached copy, unknown id, damaged cache, ...
        raise UserError(
            f"{loc.where}: cannot load it from the hub or its cache ({first_line(exc)}); "
            "pass --data.path to a local copy or use --data.source stand_in"
        ) from None
    return _dataset_splits(splits, loc.where, cfg.text_field)


# ---- streamed, atomic writers ----------------------------------------------------------------------------------
class _NpyStream:
    """A 1-D ``.npy`` file written chunk by chunk; its length is put in the header when it is finished.

    numpy pads ``.npy`` headers so that the length field can grow to any size in place, so the header
    is written once with length 0 and rewritten at the end with the same size.
    """

    def __init__(self, fh: IO[bytes], dtype: Any):
        self.fh = fh
        self.dtype = np.dtype(dtype)
        self.size = 0
        self._write_header()
        self._data_start = fh.tell()

    def _write_header(self) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (self.size,)}
        np.lib.format.write_array_header_1_0(self.fh, header)

    def append(self, values: Any) -> None:
        array = np.ascontiguousarray(values, dtype=self.dtype)
        self.fh.write(array.tobytes())
        self.size += array.size

    def finish(self) -> None:
        end = self.fh.tell()
        self.fh.seek(0)
        self._write_header()
        if self.fh.tell() != self._data_start:
            raise RuntimeError("the .npy header changed size")  # cannot happen with numpy's padded headers
        self.fh.seek(end)


class _TextSink:
    """Cleaned stories of one split: UTF-8 bytes back to back, and their offsets."""

    def __init__(self, text_fh: IO[bytes], offsets: _NpyStream):
        self.text_fh = text_fh
        self.offsets = offsets
        self.count = 0
        self._pos = 0
        self._pending: list[int] = []
        offsets.append([0])

    def add(self, story: str) -> None:
        data = story.encode("utf-8")
        self.text_fh.write(data)
        self._pos += len(data)
        self._pending.append(self._pos)
        self.count += 1
        if len(self._pending) >= _OFFSET_FLUSH:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self.offsets.append(self._pending)
            self._pending = []


@contextmanager
def _text_sink(folder: Path) -> Iterator[_TextSink]:
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_open(folder / "text.utf8", "wb") as text_fh, atomic_open(folder / "offsets.npy", "wb") as off_fh:
        sink = _TextSink(text_fh, _NpyStream(off_fh, np.int64))
        yield sink
        sink.flush()
        sink.offsets.finish()


def _stripped(split: _Split, counts: dict[str, int]) -> Iterator[str]:
    """The non-empty stories of a split, stripped; read and empty ones counted (and logged when done)."""
    where, stories = split
    read = empty = 0
    replaced_before = counts["bytes_replaced"]
    try:
        for story in stories:
            read += 1
            counts["stories_read"] += 1
            story = story.strip()
            if story:
                yield story
            else:
                empty += 1
                counts["empty_dropped"] += 1
    finally:
        close = getattr(stories, "close", None)
        if close is not None:
            close()  # a source stopped early (num_real reached) closes its file now
        if empty:
            log.warning("%s: dropped %d empty stories (kept %d of the %d read)", where, empty, read - empty, read)
        replaced = counts["bytes_replaced"] - replaced_before
        if replaced:
            log.warning("%s: replaced %d undecodable bytes with U+FFFD", where, replaced)


def _no_stories(where: str, counts: dict[str, int], read_before: int, empty_before: int) -> UserError:
    """The error for a split without a single non-empty story (counts since ``read_before``/``empty_before``)."""
    read = counts["stories_read"] - read_before
    empty = counts["empty_dropped"] - empty_before
    detail = f"all {empty} stories read are empty" if read else "no stories"
    return UserError(f"{where}: no non-empty stories ({detail})")


def _fill(stories: Iterator[str], sink: _TextSink, n: int | None, split: str) -> int:
    """Move up to ``n`` stories (all with None) into ``sink``; return how many were moved.

    Reading the published training split (2.1M stories) takes minutes: a progress line tells so.
    """
    moved = 0
    with Progress(n, f"reading the {split} split", "stories") as progress:
        for story in stories if n is None else itertools.islice(stories, n):
            sink.add(story)
            moved += 1
            progress.update()
    return moved


def _write_texts(cfg: TinyStoriesDataConfig, loc: _Location, folder: Path) -> dict[str, Any]:
    """Read the source, clean it, split it and write ``folder/<split>/``; return the read counts."""
    counts = {"stories_read": 0, "empty_dropped": 0, "bytes_replaced": 0}
    train_split, heldout_split = _open_source(cfg, loc, counts)
    num_test, num_val, num_real = cfg.num_test, cfg.num_val, cfg.num_real
    with ExitStack() as stack:
        sinks = {split: stack.enter_context(_text_sink(folder / split)) for split in SPLITS}
        if heldout_split is None:
            where = train_split[0]
            if num_test is None:
                raise UserError(
                    f"{where}: has no validation split, so --data.num_test cannot be None (all of it); give a number"
                )
            read0, empty0 = counts["stories_read"], counts["empty_dropped"]
            stories = _stripped(train_split, counts)
            got_test = _fill(stories, sinks["test"], num_test, "test")
            got_val = _fill(stories, sinks["val"], num_val, "val")
            got_train = _fill(stories, sinks["train"], num_real, "train")
            stories.close()
            total = got_test + got_val + got_train
            if total == 0:
                raise _no_stories(where, counts, read0, empty0)
            if got_train == 0 or (num_real is not None and got_train < num_real):
                wanted = f"--data.num_real {num_real}" if num_real is not None else "at least 1 training story"
                raise UserError(
                    f"{where}: {total} non-empty stories, too few for --data.num_test {num_test} + --data.num_val "
                    f"{num_val} + {wanted}"
                )
        else:
            where = heldout_split[0]
            read0, empty0 = counts["stories_read"], counts["empty_dropped"]
            held = list(_stripped(heldout_split, counts))  # the validation split is small (TinyStories: 21,990)
            if not held:
                raise _no_stories(where, counts, read0, empty0)
            test_n = num_test if num_test is not None else len(held) - num_val
            if test_n <= 0 or test_n + num_val > len(held):
                raise UserError(
                    f"{where}: {len(held)} non-empty stories, too few for --data.num_test {num_test} + "
                    f"--data.num_val {num_val}"
                )
            for story in held[:test_n]:
                sinks["test"].add(story)
            for story in held[test_n : test_n + num_val]:
                sinks["val"].add(story)
            del held
            where = train_split[0]
            read0, empty0 = counts["stories_read"], counts["empty_dropped"]
            stories = _stripped(train_split, counts)
            got_train = _fill(stories, sinks["train"], num_real, "train")
            stories.close()
            if got_train == 0:
                raise _no_stories(where, counts, read0, empty0)
            if num_real is not None and got_train < num_real:
                raise UserError(
                    f"--data.num_real {num_real} is larger than the {got_train} non-empty training stories of {where}"
                )
        sizes = {split: sinks[split].count for split in SPLITS}
    return {**counts, "stories": sizes}


# ---- datasets and batches ------------------------------------------------------------------------------------
def _checked_row(index: int, n: int, item: str, container: str) -> int:
    """``index`` of a set of ``n`` stories as a row in ``0..n-1`` (negative counts from the end), else IndexError."""
    if not -n <= index < n:
        raise IndexError(f"{item} {index} out of range for {container} of {n} stories")
    return index % n


class TokenStories(Dataset):
    """The stories of one cached split as 1-D int64 tensors ``[EOT] + ids + [EOT]`` (truncated to max_seq_len).

    Reads the cache's ``tokens.npy`` and ``offsets.npy`` memory-mapped, opening them on first use, so
    pickling the dataset (loader workers started by ``spawn``) sends file names, not data.
    """

    def __init__(self, tokens_file: str | os.PathLike, offsets_file: str | os.PathLike):
        self.tokens_file = Path(tokens_file)
        self.offsets_file = Path(offsets_file)
        self._tokens: np.ndarray | None = None
        self._offsets: np.ndarray | None = None

    def _mapped(self) -> tuple[np.ndarray, np.ndarray]:
        if self._tokens is None or self._offsets is None:
            self._tokens = np.load(self.tokens_file, mmap_mode="r")
            self._offsets = np.load(self.offsets_file, mmap_mode="r")
        return self._tokens, self._offsets

    @property
    def tokens(self) -> np.ndarray:
        """All token ids of the split, story after story (uint16, memory-mapped)."""
        return self._mapped()[0]

    @property
    def offsets(self) -> np.ndarray:
        """Story ``i`` is ``tokens[offsets[i]:offsets[i + 1]]`` (int64 ``(n + 1,)``, memory-mapped)."""
        return self._mapped()[1]

    def lengths(self) -> np.ndarray:
        """Tokens per story, int64 ``(n,)``."""
        return np.diff(np.asarray(self.offsets))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_tokens"] = state["_offsets"] = None
        return state

    def __len__(self) -> int:
        return int(self.offsets.shape[0]) - 1

    def _row(self, index: int) -> int:
        return _checked_row(index, len(self), "story", "a split")

    def __getitem__(self, index: int) -> torch.Tensor:
        row = self._row(int(index))
        start, stop = int(self.offsets[row]), int(self.offsets[row + 1])
        return torch.from_numpy(np.array(self.tokens[start:stop], dtype=np.int64))

    def __getitems__(self, indices: Sequence[int]) -> list[torch.Tensor]:
        rows = np.array([self._row(int(i)) for i in indices], dtype=np.int64)  # (B,)
        starts = np.asarray(self.offsets[rows])  # (B,)
        lengths = np.asarray(self.offsets[rows + 1]) - starts  # (B,)
        ids = torch.from_numpy(np.asarray(_gathered(self.tokens, starts, lengths), dtype=np.int64))
        return list(ids.split(lengths.tolist()))


def _gathered(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``tokens[starts[k] : starts[k] + lengths[k]]`` for every k, back to back, in one fancy-indexed read (of a
    memory map too)."""
    before = np.cumsum(lengths) - lengths  # (B,) position of each story in the gathered array
    return np.asarray(tokens[np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(starts - before, lengths)])


class StoredStories:
    """A stored synthetic story set: ``lengths`` (integers ``(n,)``, 1.. tokens of each story, the leading ``EOT``
    included) and ``tokens``, either rows padded to a width L (``(n, L)``, as sampled) or the stories back to back
    without padding (``(sum(lengths),)``, as the store keeps them: ``ragged_samples``). Raises UserError for
    arrays that are neither."""

    def __init__(self, tokens: np.ndarray, lengths: np.ndarray):
        if tokens.ndim not in (1, 2) or tokens.dtype.kind not in "iu":
            raise UserError(
                f"synthetic story tokens must be integers, (n, L) rows or (total,) back to back, "
                f"got {tokens.dtype} {tokens.shape}"
            )
        if lengths.ndim != 1 or lengths.dtype.kind not in "iu" or (tokens.ndim == 2 and len(lengths) != len(tokens)):
            rows = f"({len(tokens)},)" if tokens.ndim == 2 else "(n,)"
            raise UserError(
                f"synthetic story lengths must be integers of shape {rows}, got {lengths.dtype} {lengths.shape}"
            )
        self.tokens = tokens
        self.lengths = np.asarray(lengths, dtype=np.int64)  # (n,) integers: small next to the tokens
        low, high = (int(self.lengths.min()), int(self.lengths.max())) if len(self.lengths) else (1, 1)
        if tokens.ndim == 2:
            self.offsets: np.ndarray | None = None
            if low < 1 or high > tokens.shape[1]:
                raise UserError(
                    f"synthetic story lengths must be in 1..{tokens.shape[1]} (the row width), got {low}..{high}"
                )
        else:
            if low < 1:
                raise UserError(f"synthetic story lengths must be >= 1 (the leading EOT), got {low}")
            self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])  # story i: tokens[offsets[i]:offsets[i+1]]
            if int(self.offsets[-1]) != len(tokens):
                raise UserError(
                    f"synthetic story tokens: {len(tokens)} stored back to back, but the lengths sum to "
                    f"{int(self.offsets[-1])}"
                )

    def __len__(self) -> int:
        return len(self.lengths)

    def __getstate__(self) -> dict[str, Any]:
        # Loader workers started by spawn or forkserver (macOS; Linux from Python 3.14) get the dataset pickled:
        # a token file mapped whole (as the store opens it) travels as its name, not as gigabytes of tokens.
        state = dict(self.__dict__)
        tokens = self.tokens
        if isinstance(tokens, np.memmap) and isinstance(tokens.base, mmap.mmap) and tokens.filename:
            order = "F" if tokens.flags.f_contiguous and not tokens.flags.c_contiguous else "C"
            state["tokens"] = ("memmap", tokens.filename, tokens.offset, tokens.dtype.str, tokens.shape, order)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        tokens = state["tokens"]
        if isinstance(tokens, tuple):
            _, filename, offset, dtype, shape, order = tokens
            state["tokens"] = np.memmap(filename, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)
        self.__dict__.update(state)

    def max_id(self, chunk: int = 1 << 24) -> int:
        """The largest token id of the stories (padding not included), read ``chunk`` tokens at a time (-1 for
        no stories)."""
        high = -1
        if self.offsets is not None:
            for start in range(0, len(self.tokens), chunk):
                high = max(high, int(np.asarray(self.tokens[start : start + chunk]).max()))
            return high
        rows = max(1, chunk // max(1, self.tokens.shape[1]))
        for start in range(0, len(self), rows):
            block = np.asarray(self.tokens[start : start + rows])  # (R, L)
            inside = np.arange(block.shape[1]) < self.lengths[start : start + rows, None]  # (R, L) story tokens
            high = max(high, int(block[inside].max()))
        return high

    def rows(self, start: int, stop: int, limit: int | None = None) -> list[np.ndarray]:
        """Stories ``start..stop-1``, each its first ``min(lengths[i], limit)`` tokens."""
        return self.gather(np.arange(start, stop, dtype=np.int64), limit)

    def gather(self, rows: np.ndarray, limit: int | None = None) -> list[np.ndarray]:
        """Stories ``rows`` (int64 ``(B,)``), each its first ``min(lengths[i], limit)`` tokens, in one read."""
        lengths = self.lengths[rows] if limit is None else np.minimum(self.lengths[rows], limit)  # (B,)
        if not len(rows):
            return []
        if self.offsets is None:
            block = np.asarray(self.tokens[rows, : int(lengths.max())])  # (B, T)
            return [block[k, : lengths[k]] for k in range(len(rows))]
        return np.split(_gathered(self.tokens, self.offsets[rows], lengths), np.cumsum(lengths)[:-1])


class SyntheticStories(Dataset):
    """A stored synthetic set (:class:`StoredStories`) as items like the real ones, read story by story.

    Item ``i`` is the first ``min(lengths[i], max_seq_len)`` tokens of story ``i``, a 1-D int64 tensor.
    """

    def __init__(self, stories: StoredStories, max_seq_len: int):
        self.stories = stories
        self.max_seq_len = max_seq_len

    def __len__(self) -> int:
        return len(self.stories)

    def _row(self, index: int) -> int:
        return _checked_row(index, len(self), "sample", "a synthetic set")

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[torch.Tensor]:
        rows = np.array([self._row(int(i)) for i in indices], dtype=np.int64)  # (B,)
        return [torch.from_numpy(np.array(row, dtype=np.int64)) for row in self.stories.gather(rows, self.max_seq_len)]


def collate_stories(items: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """One story per row, right-padded with ``PAD`` to the batch's longest story.

    Returns ``input_ids``, ``attention_mask`` (1: token, 0: padding) and ``labels`` (the ids, -100 at
    padding), each int64 ``(B, T)`` with ``T`` the longest item's length.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    for item in items:
        if item.dim() != 1:
            raise ValueError(f"a story item must be a 1-D tensor of token ids, got shape {tuple(item.shape)}")
    lengths = [int(item.shape[0]) for item in items]
    input_ids = torch.full((len(items), max(lengths)), PAD_ID, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros_like(input_ids)  # (B, T)
    for row, (item, n) in enumerate(zip(items, lengths)):
        input_ids[row, :n] = item
        attention_mask[row, :n] = 1
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)  # (B, T)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _never_train() -> list[str]:
    raise RuntimeError("an existing tokenizer is only ever loaded")  # load_or_train calls it only without a file


# ---- the data module ---------------------------------------------------------------------------------------------
class TinyStoriesDataModule(RealDataModuleBase[TokenStories]):
    """Stories for the causal LM: real training set, optional validation set, test set, frozen tokenizer.

    See the module docstring for the sources, the split policy, the tokenizer rule and the cache.
    :meth:`prepare_data` reads and tokenises the data into the cache (once per data identity);
    :meth:`setup` memory-maps it, on any process, after one process prepared it. After either,
    :attr:`tokenizer` (a ``tokenizers.Tokenizer``), :attr:`tokenizer_hash`, :attr:`tokenizer_file`
    and :attr:`data_stats` are set. ``train_dataset`` holds the first ``num_real`` stories of the training
    split, ``val_dataset`` is None when ``num_val`` is 0; the loaders batch with :attr:`collate_fn`
    (:class:`~datamodules.base.RealDataModuleBase`).

    Args:
        config: the data settings (``--data.*``); default: the stand-in corpus.
        run_dir: the run directory; its ``tokenizer.json``, when present, is THE tokenizer (never retrained).
        batch_size: batch size of this module's own loaders (standalone use).
        num_workers: worker processes of this module's own loaders.
    """

    collate_fn = staticmethod(collate_stories)
    """The collate function of every story loader: see :func:`collate_stories`."""

    def __init__(
        self,
        config: TinyStoriesDataConfig | None = None,
        run_dir: str | os.PathLike | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
    ):
        super().__init__(batch_size, num_workers)
        self.config = config if config is not None else TinyStoriesDataConfig()
        if self.config.max_seq_len is None:  # not tied to a model: the short default context
            self.config = dataclasses.replace(self.config, max_seq_len=DEFAULT_MAX_SEQ_LEN)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.tokenizer: Tokenizer | None = None
        """The frozen tokenizer (after prepare_data or setup)."""
        self.tokenizer_hash: str | None = None
        """:func:`~datamodules.tokenizer.tokenizer_hash` of :attr:`tokenizer`."""
        self.tokenizer_file: Path | None = None
        """Where :attr:`tokenizer` was loaded from or written to: the file the recipe copies into the run dir."""
        self.tokenizer_origin: str | None = None
        """``run_dir`` (the run's own), ``cache`` (an earlier preparation's) or ``trained`` (just now)."""
        self.data_stats: dict[str, Any] = {}
        """Counts for the recipe to log: stories read / dropped / per split, bytes replaced, tokens, truncations."""
        self._location: _Location | None = None
        self._identity: dict[str, Any] = {}
        self._entry: Path | None = None

    # ---- identity and cache -------------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        """How reports name the data: :data:`STAND_IN_LABEL` for the stand-in corpus, never "TinyStories"."""
        cfg = self.config
        if cfg.source == "stand_in":
            return STAND_IN_LABEL
        if cfg.source == "hub":
            spec = cfg.path or DEFAULT_HUB_ID
            local = Path(spec).expanduser().exists()
            return f"TinyStories (hub format, {spec})" if local else f"TinyStories ({spec})"
        if cfg.source == "hub_v2":
            return f"TinyStories V2, GPT-4 stories ({cfg.path or DEFAULT_HUB_ID})"
        return f"{cfg.source} stories from {cfg.path}"

    @property
    def cache_root(self) -> Path:
        """The cache folder (``--data.cache_dir`` or :func:`default_cache_dir`)."""
        if self.config.cache_dir:
            return check_writable_folder(Path(self.config.cache_dir).expanduser(), "--data.cache_dir")
        return check_writable_folder(default_cache_dir(), f"the cache folder (${CACHE_ENV} or ~/.cache)")

    @property
    def cache_entry(self) -> Path:
        """This data identity's folder in the cache (resolving the source; UserError for missing files)."""
        if self._entry is None:
            self._location = _locate(self.config)
            identity = data_identity(self.config, self._location)
            self._entry = self.cache_root / f"{self.config.source}-{cache_key(identity)}"
            self._identity = identity
        return self._entry

    def _tokens_dir(self) -> Path:
        assert self.tokenizer_hash is not None
        return self.cache_entry / f"tokens-{self.tokenizer_hash[:16]}"

    def describe(self) -> str:
        """A short description for a dry run (``key: value`` lines), from the config alone: nothing is read."""
        cfg = self.config
        held = "the whole held-out split" if cfg.num_test is None else str(cfg.num_test)
        real = "all" if cfg.num_real is None else str(cfg.num_real)
        if cfg.source == "stand_in" and cfg.num_real is None:
            real = str(cfg.stand_in_total() - (cfg.num_test or 0) - cfg.num_val)
        return "\n".join(
            [
                f"data: {self.label}",
                f"stories: {real} real training, {cfg.num_val} validation, {held} test",
                f"vocab_size: {cfg.vocab_size}",
                f"max_seq_len: {cfg.max_seq_len}",
                f"cache: {self.cache_root}",
            ]
        )

    # ---- Lightning hooks ------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Read, clean and split the source; resolve or train the tokenizer; tokenise. Each step only once per cache."""
        entry = self.cache_entry
        assert self._location is not None
        with entry_lock(entry, "this data cache entry"):  # another run on this machine may be building it
            texts = entry / "texts"
            if not (texts / STATS_FILE).is_file():
                make_folder(entry, "the data cache folder")
                atomic_write_json(entry / "identity.json", self._identity)
                counts = _write_texts(self.config, self._location, texts)
                atomic_write_json(texts / STATS_FILE, counts)
                log.info("%s: %s stories (train/val/test) cached in %s", self.label, counts["stories"], entry)
            self._resolve_tokenizer(train=True)
            tokens = self._tokens_dir()
            if not (tokens / STATS_FILE).is_file():
                self._write_tokens(tokens)
        self._load_stats()

    def _load_datasets(self) -> dict[str, TokenStories | None]:
        """Memory-map the prepared splits (:meth:`setup` calls it once).

        Works on any process once one of them ran :meth:`prepare_data` with the same config (DDP ranks
        > 0): the tokenizer is resolved the same way, but never trained here.
        """
        entry = self.cache_entry
        if not (entry / "texts" / STATS_FILE).is_file():
            raise UserError(f"{entry}: the data is not prepared; call prepare_data() first (on one process)")
        if self.tokenizer is None:  # not resolved by prepare_data in this process (e.g. a DDP rank > 0)
            self._resolve_tokenizer(train=False)
        tokens = self._tokens_dir()
        if not (tokens / STATS_FILE).is_file():
            raise UserError(f"{tokens}: the data is not tokenised yet; call prepare_data() first (on one process)")
        datasets = {s: TokenStories(tokens / s / "tokens.npy", tokens / s / "offsets.npy") for s in SPLITS}
        for split, dataset in datasets.items():
            len(dataset)  # open now: a missing file fails here, not in a loader worker
            if split == "train" and len(dataset) == 0:
                raise UserError(f"{tokens}: an empty training split; delete {entry} to rebuild the cache")
        self._load_stats()
        return {**datasets, "val": datasets["val"] if self.config.num_val else None}

    # ---- preparation steps ------------------------------------------------------------------------------------------
    def _resolve_tokenizer(self, train: bool) -> None:
        """Set the tokenizer: the run's, else the cache's, else (``train``) a new one trained on the training split."""
        vocab = self.config.vocab_size
        entry = self.cache_entry
        tokenizer: Tokenizer
        if self.run_dir is not None and (self.run_dir / TOKENIZER_FILE).exists():
            tokenizer = tok.load_or_train(self.run_dir, _never_train, vocab)
            path, origin = self.run_dir / TOKENIZER_FILE, "run_dir"
        elif (entry / TOKENIZER_FILE).exists():
            try:
                tokenizer = tok.load_or_train(entry, _never_train, vocab)
            except UserError as exc:
                file = entry / TOKENIZER_FILE
                reason = str(exc).split("; ")[0].removeprefix(f"{file}: ")
                raise UserError(f"{file}: a damaged cache file ({reason}); delete {entry} to rebuild it") from None
            path, origin = entry / TOKENIZER_FILE, "cache"
        elif train:
            n = self._split_size("train")
            log.info("training a %d-token BPE on the %d real training stories", vocab, n)
            # Trains on exactly the real training set and writes <entry>/tokenizer.json (atomically).
            tokenizer = tok.load_or_train(entry, lambda: self._counted_texts("train", n), vocab)
            path, origin = entry / TOKENIZER_FILE, "trained"
        else:
            raise UserError(f"{entry}: no tokenizer yet; call prepare_data() first (on one process)")
        self.tokenizer = tokenizer
        self.tokenizer_hash = tok.tokenizer_hash(tokenizer)
        self.tokenizer_file = path
        self.tokenizer_origin = origin

    def _write_tokens(self, folder: Path) -> None:
        """Encode every split (batched, parallel) into ``folder/<split>/tokens.npy`` and ``offsets.npy``."""
        assert self.tokenizer is not None
        limit = self.config.max_seq_len
        summary: dict[str, Any] = {"tokenizer_hash": self.tokenizer_hash, "max_seq_len": limit, "splits": {}}
        for split in SPLITS:
            (folder / split).mkdir(parents=True, exist_ok=True)
            n_stories = n_tokens = truncated = 0
            with (
                atomic_open(folder / split / "tokens.npy", "wb") as tokens_fh,
                atomic_open(folder / split / "offsets.npy", "wb") as offsets_fh,
            ):
                tokens, offsets = _NpyStream(tokens_fh, np.uint16), _NpyStream(offsets_fh, np.int64)
                offsets.append([0])
                progress = Progress(self._split_size(split), f"tokenising {split} split", "stories")
                for chunk in self._text_chunks(split):
                    encoded = tok.encode_stories(self.tokenizer, chunk, batch_size=2048)
                    lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
                    long = lengths > limit
                    truncated += int(long.sum())
                    if long.any():
                        encoded = [ids[:limit] for ids in encoded]
                        lengths = np.minimum(lengths, limit)
                    size = int(lengths.sum())
                    tokens.append(np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.uint16, count=size))
                    offsets.append(n_tokens + np.cumsum(lengths))
                    n_stories += len(encoded)
                    n_tokens += size
                    progress.update(len(encoded))
                progress.close()
                tokens.finish()
                offsets.finish()
            if truncated:
                log.info("%s split: truncated %d of %d stories to max_seq_len %d", split, truncated, n_stories, limit)
            summary["splits"][split] = {"stories": n_stories, "tokens": n_tokens, "truncated": truncated}
        atomic_write_json(folder / STATS_FILE, summary)

    def _load_stats(self) -> None:
        texts = json.loads((self.cache_entry / "texts" / STATS_FILE).read_text())
        tokens = json.loads((self._tokens_dir() / STATS_FILE).read_text())
        stats: dict[str, Any] = {
            "label": self.label,
            "source": self.config.source,
            "stories_read": texts["stories_read"],
            "empty_dropped": texts["empty_dropped"],
            "bytes_replaced": texts["bytes_replaced"],
            "truncated": sum(s["truncated"] for s in tokens["splits"].values()),
        }
        for split, values in tokens["splits"].items():
            for name, value in values.items():
                stats[f"{split}_{name}"] = value
        stats.update(
            max_seq_len=self.config.max_seq_len,
            vocab_size=self.tokenizer.get_vocab_size() if self.tokenizer is not None else None,
            tokenizer_hash=self.tokenizer_hash,
            tokenizer_origin=self.tokenizer_origin,
        )
        self.data_stats = stats

    # ---- cached texts ----------------------------------------------------------------------------------------------
    def _split_size(self, split: str) -> int:
        return int(np.load(self.cache_entry / "texts" / split / "offsets.npy", mmap_mode="r").shape[0]) - 1

    def _text_chunks(self, split: str, limit: int | None = None) -> Iterator[list[str]]:
        """The cached cleaned stories of ``split`` (the first ``limit``), ``_ENCODE_CHUNK`` at a time."""
        folder = self.cache_entry / "texts" / split
        offsets = np.load(folder / "offsets.npy", mmap_mode="r")
        n = int(offsets.shape[0]) - 1 if limit is None else min(limit, int(offsets.shape[0]) - 1)
        with open(folder / "text.utf8", "rb") as fh:
            for start in range(0, n, _ENCODE_CHUNK):
                stop = min(n, start + _ENCODE_CHUNK)
                bounds = np.asarray(offsets[start : stop + 1], dtype=np.int64)
                fh.seek(int(bounds[0]))
                data = fh.read(int(bounds[-1] - bounds[0]))
                cuts = (bounds - bounds[0]).tolist()
                yield [data[a:b].decode("utf-8") for a, b in zip(cuts[:-1], cuts[1:])]

    def _counted_texts(self, split: str, total: int) -> Iterator[str]:
        """The split's stories, with progress lines while a consumer (the BPE trainer) reads them."""
        with Progress(total, f"training the tokenizer on the {split} split", "stories") as progress:
            for text in self._iter_texts(split):
                yield text
                progress.update()

    def _iter_texts(self, split: str, limit: int | None = None) -> Iterator[str]:
        for chunk in self._text_chunks(split, limit):
            yield from chunk

    def _require_prepared(self) -> None:
        if not (self.cache_entry / "texts" / STATS_FILE).is_file():
            raise UserError(f"{self.cache_entry}: the data is not prepared; call prepare_data() first")

    def train_texts(self, limit: int | None = None) -> list[str]:
        """The real training stories as cleaned text (the first ``limit``), as one list."""
        self._require_prepared()
        return list(self._iter_texts("train", limit))

    def iter_train_texts(self) -> Iterator[str]:
        """The real training stories as cleaned text, read from the cache a chunk at a time: what the rare-word
        statistics read, since a published-size set (2.12M stories) is about 2 GB as one list of strings."""
        self._require_prepared()
        return self._iter_texts("train")

    def num_train_texts(self) -> int:
        """How many real training stories :meth:`iter_train_texts` yields."""
        self._require_prepared()
        return self._split_size("train")

    def val_texts(self) -> list[str]:
        """The validation stories as cleaned text."""
        self._require_prepared()
        return list(self._iter_texts("val"))

    def test_texts(self) -> list[str]:
        """The test stories as cleaned text."""
        self._require_prepared()
        return list(self._iter_texts("test"))

    # ---- datasets ----------------------------------------------------------------------------------------------
    def first_tokens(self) -> np.ndarray:
        """Token 1 (the first after ``EOT``) of every real training story, int64 ``(n,)``."""
        dataset = self.train_dataset
        return np.asarray(dataset.tokens[np.asarray(dataset.offsets[:-1]) + 1], dtype=np.int64)

    def synthetic_dataset(self, arrays: Mapping[str, np.ndarray]) -> SyntheticStories:
        """A stored synthetic set as items like the real ones (indexed lazily, never read whole).

        ``arrays``: ``tokens`` and ``lengths`` (:class:`StoredStories`: padded rows, or the stories back to
        back as the store keeps them) and optionally ``finished`` (bool ``(n,)``, not used here). Raises
        UserError for missing keys, wrong shapes, or token ids outside the vocabulary (which would fail deep
        inside the embedding, on a GPU as an unreadable device-side assert).
        """
        missing = [key for key in ("tokens", "lengths") if key not in arrays]
        if missing:
            raise UserError(f"a synthetic story set needs 'tokens' and 'lengths' arrays, got {sorted(arrays)}")
        stories = StoredStories(arrays["tokens"], arrays["lengths"])
        n = len(stories)
        if "finished" in arrays and arrays["finished"].shape != (n,):
            raise UserError(f"synthetic story 'finished' flags must have shape ({n},), got {arrays['finished'].shape}")
        vocab = self.tokenizer.get_vocab_size() if self.tokenizer is not None else self.config.vocab_size
        high = stories.max_id()
        if high >= vocab:
            raise UserError(
                f"synthetic story tokens must be ids below the vocabulary size {vocab}, got id {high}: this set "
                f"was not drawn with this run's tokenizer"
            )
        return SyntheticStories(stories, self.config.max_seq_len)


__all__ = [
    "DEFAULT_HUB_ID",
    "DEFAULT_MAX_SEQ_LEN",
    "DEFAULT_NUM_TEST",
    "DEFAULT_STAND_IN_TRAIN",
    "HELDOUT_SPLITS",
    "IGNORE_INDEX",
    "SOURCES",
    "SPLITS",
    "StoredStories",
    "V2_FILES",
    "SyntheticStories",
    "TinyStoriesDataConfig",
    "TinyStoriesDataModule",
    "TokenStories",
    "cache_key",
    "collate_stories",
    "data_identity",
    "default_cache_dir",
]

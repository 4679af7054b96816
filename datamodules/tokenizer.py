"""The frozen byte-level BPE tokenizer of the TinyStories experiment.

Every generation trains a causal LM from scratch, and losses (nats per token) are only comparable
across generations if the token boundaries never change. So the tokenizer is trained ONCE, on the real
training split at generation 0, written to ``<run_dir>/tokenizer.json``, and only ever loaded after
that (:func:`load_or_train`). A missing file means "train"; a corrupt or mismatched file is a
:class:`~collapse.errors.UserError`, never a silent retrain.

Design choices:

* **Byte-level BPE** (GPT-2 style): the 256 byte symbols are all in the initial alphabet, so any UTF-8
  text (accents, emoji, Chinese) encodes without an unknown token and decodes back exactly.
* **Special tokens** ``EOT`` (id 0) and ``PAD`` (id 1). ``EOT`` is the story separator of the official
  TinyStories files and serves as both BOS and EOS, as in the TinyStories authors' setup: every story
  is encoded as ``[EOT] + ids + [EOT]``, so the model learns to start a story after ``EOT`` and to end
  one with it. ``PAD`` only fills batches and is masked out of the loss.
* **Vocabulary size.** BPE stops early when no pair occurs ``min_frequency`` times, so a small or
  repetitive corpus gives fewer than ``vocab_size`` tokens (the offline stand-in corpus tops out
  near 5,200 however many stories it has). :func:`train_bpe` returns the real size; by default
  :func:`load_or_train` then pads the vocabulary with never-produced ``<|reserved_i|>`` special tokens
  (:func:`pad_vocab_to`) so that ``tokenizer.get_vocab_size()`` is exactly the requested size and the
  model's parameter count matches the recipe's. The extra embedding rows are dead weight (no input ever
  maps to them; their logits are simply pushed down), which costs far less than a model whose size
  depends on the corpus. The shortfall is logged. Models must still size their embeddings from
  ``tokenizer.get_vocab_size()``, never from the requested number.
* **Bad input is counted, never hidden.** :func:`clean_stories` drops blank stories and returns how
  many; :func:`read_text_lenient` replaces undecodable bytes and returns how many;
  :func:`read_text_strict` refuses them, naming the file and byte offset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from collapse.atomic import atomic_write_text
from collapse.errors import UserError

log = logging.getLogger(__name__)

EOT = "<|endoftext|>"
"""Story separator of the TinyStories files; used as both BOS and EOS (id 0)."""

PAD = "<|pad|>"
"""Padding token (id 1); never part of a story, masked out of the loss."""

TOKENIZER_FILE = "tokenizer.json"
"""Name of the frozen tokenizer inside a run directory."""

DEFAULT_VOCAB_SIZE = 8000
"""Vocabulary size of the TinyStories recipe."""

RESERVED_FORMAT = "<|reserved_{}|>"
"""Names of the padding tokens added by :func:`pad_vocab_to`."""

EOT_ID = 0
PAD_ID = 1


def train_bpe(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE with special tokens ``EOT`` (id 0) and ``PAD`` (id 1).

    Deterministic: the same texts in the same order give a byte-identical ``to_str()`` (checked across
    processes, hash seeds and thread counts). The result may have fewer than ``vocab_size`` tokens when
    the corpus runs out of pairs seen ``min_frequency`` times; see :func:`pad_vocab_to`.
    """
    if vocab_size < 258:
        # 256 byte symbols + 2 special tokens is the floor; asking for less would silently drop bytes.
        raise UserError(f"vocab_size must be at least 258 (256 bytes + 2 special tokens), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False: a story's first word is encoded as written, like GPT-2 on TinyStories.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        # Listed first, so they get ids 0 and 1 whatever the corpus.
        special_tokens=[EOT, PAD],
        # All 256 bytes, even ones absent from the corpus: any UTF-8 text stays encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def pad_vocab_to(tokenizer: Tokenizer, n: int) -> int:
    """Add ``<|reserved_i|>`` special tokens until the vocabulary has exactly ``n`` entries.

    Returns how many were added (0 when already at ``n``). The reserved tokens are never produced for
    ordinary text and are skipped when decoding. Raises ``UserError`` if the vocabulary exceeds ``n``.
    """
    size = tokenizer.get_vocab_size()
    if size > n:
        raise UserError(f"tokenizer has {size} tokens, more than the {n} it should be padded to")
    missing = n - size
    if missing:
        tokenizer.add_special_tokens([RESERVED_FORMAT.format(i) for i in range(missing)])
    return missing


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """SHA-256 of the tokenizer's canonical JSON (sorted keys, compact), for run manifests."""
    canonical = json.dumps(json.loads(tokenizer.to_str()), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def encodes_alike(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether ``a`` and ``b`` turn text into the same ids: same normalizer, pre-tokenizer, model (vocabulary and
    merges) and added tokens. Settings that do not change ids (padding, truncation, special-token flags that a
    ``transformers`` wrapper sets when it saves) are not compared."""
    parts = ("normalizer", "pre_tokenizer", "model")
    ja, jb = json.loads(a.to_str()), json.loads(b.to_str())
    same_parts = all(ja.get(key) == jb.get(key) for key in parts)
    return same_parts and a.get_vocab(with_added_tokens=True) == b.get_vocab(with_added_tokens=True)


def _check_specials(tokenizer: Tokenizer, path: Path) -> None:
    """Raise ``UserError`` unless ``EOT`` and ``PAD`` have ids 0 and 1 (every encoder here relies on it)."""
    for token, expected in ((EOT, EOT_ID), (PAD, PAD_ID)):
        got = tokenizer.token_to_id(token)
        if got != expected:
            raise UserError(
                f"{path}: token {token!r} has id {got}, expected {expected}; not a tokenizer of this project"
            )


def load_or_train(
    run_dir: str | os.PathLike,
    texts_factory: Callable[[], Iterable[str]],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    min_frequency: int = 2,
    pad: bool = True,
) -> Tokenizer:
    """Load the run's frozen tokenizer, or train and save it if the run has none yet.

    ``texts_factory`` is called only when training (generation 0), so later generations never read the
    real corpus for this. An existing file is NEVER retrained: an unreadable one, one without ``EOT``/
    ``PAD`` at ids 0/1, or one of the wrong size is a ``UserError`` naming the file, because a
    replacement would change every generation's numbers. With ``pad`` (the default) a fresh tokenizer
    is padded to exactly ``vocab_size`` and a stored one must have exactly that size; without it, a
    stored tokenizer may be smaller (its corpus ran out of merges) but never larger.
    """
    path = Path(run_dir) / TOKENIZER_FILE
    if path.exists():
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON or an unknown schema.
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(
                f"{path}: cannot be read as a tokenizer ({first_line}); restore it or start a new run "
                "(it is not retrained, which would change every generation's token counts)"
            ) from exc
        _check_specials(tokenizer, path)
        size = tokenizer.get_vocab_size()
        if size > vocab_size or (pad and size != vocab_size):
            raise UserError(f"{path}: has {size} tokens but {vocab_size} were requested; use the run's own size")
        return tokenizer

    tokenizer = train_bpe(texts_factory(), vocab_size=vocab_size, min_frequency=min_frequency)
    learned = tokenizer.get_vocab_size()
    if learned < vocab_size:
        action = "padded with reserved tokens" if pad else "kept at that size"
        log.warning("tokenizer: corpus gave %d of %d tokens; %s", learned, vocab_size, action)
    if pad:
        pad_vocab_to(tokenizer, vocab_size)
    atomic_write_text(path, tokenizer.to_str())
    return tokenizer


def clean_stories(stories: Iterable[str]) -> tuple[list[str], int]:
    """Strip each story and drop the blank ones; return ``(kept, dropped_count)``.

    The count is also logged, so a corpus with holes never shrinks unnoticed.
    """
    kept: list[str] = []
    dropped = 0
    for story in stories:
        story = story.strip()
        if story:
            kept.append(story)
        else:
            dropped += 1
    if dropped:
        log.warning("dropped %d empty stories (kept %d)", dropped, len(kept))
    return kept, dropped


def encode_stories(
    tokenizer: Tokenizer, stories: Sequence[str], add_eos: bool = True, batch_size: int = 1024
) -> list[list[int]]:
    """Encode each story as ``[EOT] + ids + [EOT]`` (``[EOT] + ids`` without ``add_eos``).

    ``EOT`` is both BOS and EOS, as in the TinyStories authors' setup. Batches go through
    ``encode_batch``, which runs in parallel in Rust. Stories must already be cleaned
    (:func:`clean_stories`): a blank one is a ``UserError`` rather than a silent ``[EOT, EOT]``.
    """
    eot = tokenizer.token_to_id(EOT)
    if eot is None:
        raise UserError(f"tokenizer has no {EOT!r} token")
    head, tail = [eot], ([eot] if add_eos else [])
    out: list[list[int]] = []
    for start in range(0, len(stories), batch_size):
        batch = list(stories[start : start + batch_size])
        for offset, story in enumerate(batch):
            if not story.strip():
                raise UserError(f"story {start + offset} is empty; run clean_stories first")
        # add_special_tokens=False: BOS/EOS are added here, explicitly, not by a post-processor.
        for enc in tokenizer.encode_batch(batch, add_special_tokens=False):
            out.append(head + enc.ids + tail)
    return out


def to_token_stream(encoded: Iterable[Sequence[int]], vocab_size: int | None = None) -> np.ndarray:
    """Concatenate encoded stories into one flat array for memory-mapped packing.

    ``uint16`` when every id fits (vocab up to 65,536: half the disk and page cache of ``int32``),
    else ``int32``. The dtype follows ``vocab_size`` when given, so every shard of a run gets the same
    dtype; otherwise the largest id present.
    """
    flat = np.fromiter((i for ids in encoded for i in ids), dtype=np.int64)
    top = (vocab_size - 1) if vocab_size is not None else (int(flat.max()) if flat.size else 0)
    if flat.size and int(flat.min()) < 0:
        raise UserError("token stream has a negative id")
    dtype = np.uint16 if top <= np.iinfo(np.uint16).max else np.int32
    return flat.astype(dtype)


def decode(tokenizer: Tokenizer, ids: Iterable[int]) -> str:
    """Decode ids to text, skipping special tokens (``EOT``, ``PAD``, reserved)."""
    values = ids.tolist() if isinstance(ids, np.ndarray) else [int(i) for i in ids]  # Python ints either way
    return tokenizer.decode(values, skip_special_tokens=True)


def decode_rows(tokenizer: Tokenizer, rows: Sequence[np.ndarray]) -> list[str]:
    """:func:`decode` of each of ``rows`` (1-D integer arrays), decoded in parallel."""
    return tokenizer.decode_batch([row.tolist() for row in rows], skip_special_tokens=True)


# Lone surrogates U+DC80..U+DCFF are what ``surrogateescape`` makes of undecodable bytes, one per byte.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def read_text_lenient(path: str | os.PathLike) -> tuple[str, int]:
    """Read a UTF-8 file, replacing each undecodable byte with U+FFFD; return ``(text, n_replaced)``.

    ``n_replaced`` counts bytes (not runs of bytes, unlike ``errors="replace"``) and is logged when
    non-zero, so the caller can report or reject a damaged corpus. Use :func:`read_text_strict` to
    refuse such a file outright.
    """
    raw = Path(path).read_bytes()
    text = raw.decode("utf-8", errors="surrogateescape")
    text, n_replaced = _ESCAPED_BYTE.subn("\ufffd", text)
    if n_replaced:
        log.warning("%s: replaced %d undecodable bytes with U+FFFD", path, n_replaced)
    return text, n_replaced


def read_text_strict(path: str | os.PathLike) -> str:
    """Read a UTF-8 file; a byte that is not valid UTF-8 is a ``UserError`` naming the file and offset."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not valid UTF-8 at byte offset {exc.start} ({exc.reason})") from None


def to_transformers(tokenizer: Tokenizer):
    """Wrap as a ``transformers.PreTrainedTokenizerFast`` with bos/eos = ``EOT`` and pad = ``PAD``.

    For ``generate``-based baselines. The wrapper adds no BOS/EOS of its own (the raw tokenizer has no
    post-processor), so ``wrapper(text)["input_ids"]`` equals ``tokenizer.encode(text).ids``.
    """
    # Imported here: transformers is slow to import and only the baselines need it.
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        # A copy, so special tokens the wrapper registers never leak into the frozen tokenizer.
        tokenizer_object=Tokenizer.from_str(tokenizer.to_str()),
        bos_token=EOT,
        eos_token=EOT,
        pad_token=PAD,
    )

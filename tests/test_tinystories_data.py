"""The TinyStories data module: every source on small local files in the real formats, the frozen tokenizer,
the token cache, the padding policy and the handling of bad input.

Everything runs offline on the CPU with a tiny vocabulary and a few dozen stories: the files are written by
the tests themselves (stand-in stories in the TinyStories formats), the hub download is monkeypatched.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import datamodules.tinystories as ts
import datamodules.tokenizer as tok
from collapse.contract import RealDataModule
from collapse.errors import ConfigError, UserError
from collapse.store import GenerationStore
from datamodules.story_corpus import STAND_IN_LABEL, format_corpus, generate_stories, write_corpus
from datamodules.synthetic import SyntheticAccumulatingDataModule
from datamodules.tinystories import (
    IGNORE_INDEX,
    TinyStoriesDataConfig,
    TinyStoriesDataModule,
    collate_stories,
)
from datamodules.tokenizer import EOT_ID, PAD_ID, TOKENIZER_FILE

VOCAB = 300  # 256 bytes + EOT + PAD + a few merges: trains in milliseconds
LONG = 2048  # a max_seq_len no story of the tests reaches (byte-level, few merges: ~800 tokens at most)


# ---- helpers ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stories() -> list[str]:
    """40 stand-in stories (the real formats are filled with them)."""
    return generate_stories(40, seed=3)


def config(tmp_path: Path, **kwargs) -> TinyStoriesDataConfig:
    """A test config: cache under tmp_path, tiny vocabulary, no truncation unless asked."""
    kwargs = {"cache_dir": str(tmp_path / "cache"), "vocab_size": VOCAB, "max_seq_len": LONG, **kwargs}
    return TinyStoriesDataConfig(**kwargs)


def prepared(cfg: TinyStoriesDataConfig, run_dir: Path | None = None) -> TinyStoriesDataModule:
    dm = TinyStoriesDataModule(cfg, run_dir=run_dir, batch_size=4)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def assert_one_line_user_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> str:
    """The error is a UserError with a one-line message containing every fragment."""
    message = str(excinfo.value)
    assert isinstance(excinfo.value, UserError)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def check_splits(dm: TinyStoriesDataModule, train: list[str], val: list[str], test: list[str]) -> None:
    """The module's splits hold exactly these stories, as texts and as EOT-framed tokens that decode back."""
    assert dm.train_texts() == train and dm.val_texts() == val and dm.test_texts() == test
    assert list(dm.iter_train_texts()) == train and dm.num_train_texts() == len(train)
    datasets = {"train": dm.train_dataset, "val": dm.val_dataset, "test": dm.test_dataset}
    for split, texts in (("train", train), ("val", val), ("test", test)):
        dataset = datasets[split]
        if split == "val" and not texts:
            assert dataset is None
            continue
        assert len(dataset) == len(texts)
        for item, text in zip(dataset.__getitems__(list(range(len(texts)))), texts):
            assert item.dtype == torch.int64 and item.dim() == 1
            assert item[0] == EOT_ID and item[-1] == EOT_ID
            assert tok.decode(dm.tokenizer, item[1:-1].tolist()) == text
            assert torch.equal(item, torch.tensor([EOT_ID, *dm.tokenizer.encode(text).ids, EOT_ID]))
    stats = dm.data_stats
    assert (stats["train_stories"], stats["val_stories"], stats["test_stories"]) == (len(train), len(val), len(test))


def write_v2_style(folder: Path, train: list[str], valid: list[str], names=("train.txt", "valid.txt")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / names[0]).write_text(format_corpus(train))
    (folder / names[1]).write_text(format_corpus(valid))
    return folder


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": i, field: t}) + "\n" for i, t in enumerate(texts)))
    return path


# ---- config -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"source": "books"}, "--data.source"),
        ({"source": "txt"}, "--data.path"),
        ({"source": "jsonl"}, "--data.path"),
        ({"source": "arrow"}, "--data.path"),
        ({"path": "x.txt"}, "--data.path"),  # stand_in takes no path
        ({"num_real": 0}, "--data.num_real"),
        ({"num_real": True}, "--data.num_real"),
        ({"num_val": -1}, "--data.num_val"),
        ({"num_test": 0}, "--data.num_test"),
        ({"num_test": None}, "--data.num_test"),  # stand_in has no validation split
        ({"stand_in_stories": 0}, "--data.stand_in_stories"),
        ({"stand_in_stories": 10, "num_test": 8, "num_val": 2}, "--data.stand_in_stories"),
        ({"stand_in_seed": -1}, "--data.stand_in_seed"),
        ({"vocab_size": 257}, "--data.vocab_size"),
        ({"vocab_size": 70000}, "--data.vocab_size"),
        ({"max_seq_len": 2}, "--data.max_seq_len"),
        ({"text_field": ""}, "--data.text_field"),
        ({"strict_utf8": "yes"}, "--data.strict_utf8"),
    ],
)
def test_bad_flags_are_one_line_config_errors(kwargs, flag):
    with pytest.raises(ConfigError) as excinfo:
        TinyStoriesDataConfig(**kwargs)
    assert_one_line_user_error(excinfo, flag)


def test_stand_in_defaults_cover_the_splits():
    cfg = TinyStoriesDataConfig()
    assert cfg.source == "stand_in" and cfg.vocab_size == 8000 and cfg.max_seq_len is None  # the model's context
    assert ts.TinyStoriesDataModule(cfg).config.max_seq_len == ts.DEFAULT_MAX_SEQ_LEN == 256  # a module alone
    assert cfg.stand_in_total() == ts.DEFAULT_NUM_TEST + ts.DEFAULT_STAND_IN_TRAIN
    assert TinyStoriesDataConfig(num_real=50, num_val=5, num_test=10).stand_in_total() == 65
    assert TinyStoriesDataConfig(stand_in_stories=100, num_test=10).stand_in_total() == 100


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(ts.CACHE_ENV, str(tmp_path / "c"))
    assert ts.default_cache_dir() == tmp_path / "c" / "tinystories"
    monkeypatch.delenv(ts.CACHE_ENV)
    assert ts.default_cache_dir() == Path.home() / ".cache" / "model-collapse" / "tinystories"


# ---- sources ----------------------------------------------------------------------------------------------------
def test_stand_in_splits_are_prefixes_of_the_generated_corpus(tmp_path):
    dm = prepared(config(tmp_path, num_real=20, num_val=3, num_test=5))
    corpus = generate_stories(28, seed=0)
    check_splits(dm, train=corpus[8:], val=corpus[5:8], test=corpus[:5])
    assert dm.label == STAND_IN_LABEL and "not TinyStories" in dm.data_stats["label"]
    assert dm.data_stats["stories_read"] == 28 and dm.data_stats["empty_dropped"] == 0
    assert dm.tokenizer.get_vocab_size() == VOCAB and dm.tokenizer_origin == "trained"
    assert isinstance(dm, RealDataModule)
    assert "stand-in" in dm.describe() and "20 real training" in dm.describe()


def test_stand_in_test_split_does_not_depend_on_num_real(tmp_path):
    small = prepared(config(tmp_path, num_real=10, num_test=6))
    large = prepared(config(tmp_path, num_real=25, num_test=6, stand_in_stories=40))
    assert small.cache_entry != large.cache_entry
    assert small.test_texts() == large.test_texts()
    assert large.train_texts(10) == small.train_texts()  # a smaller real set is a prefix of a larger one


def test_txt_single_file_carves_the_held_out_stories(tmp_path, stories):
    path = write_corpus(tmp_path / "TinyStories-train.txt", 40, seed=3)
    dm = prepared(config(tmp_path, source="txt", path=str(path), num_test=5, num_val=3))
    check_splits(dm, train=stories[8:], val=stories[5:8], test=stories[:5])
    assert dm.label == f"txt stories from {path}"


@pytest.mark.parametrize(
    "names",
    [
        ("TinyStories-train.txt", "TinyStories-valid.txt"),
        ("TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt"),
    ],
)
def test_txt_folder_reads_the_train_and_valid_files(tmp_path, stories, names):
    folder = write_v2_style(tmp_path / "raw", stories[:30], stories[30:], names)
    (folder / "README.md").write_text("not a split")
    dm = prepared(config(tmp_path, source="txt", path=str(folder), num_test=None, num_val=2, num_real=25))
    check_splits(dm, train=stories[:25], val=stories[38:], test=stories[30:38])
    assert dm.data_stats["stories_read"] == 10 + 25  # reading stops at num_real


def test_jsonl_file_and_folder(tmp_path, stories):
    file = write_jsonl(tmp_path / "all.jsonl", stories, field="story")
    dm = prepared(config(tmp_path, source="jsonl", path=str(file), text_field="story", num_test=4))
    check_splits(dm, train=stories[4:], val=[], test=stories[:4])

    folder = tmp_path / "jsonl"
    write_jsonl(folder / "stories-train.jsonl", stories[:30])
    write_jsonl(folder / "stories-valid.jsonl", stories[30:])
    dm = prepared(config(tmp_path, source="jsonl", path=str(folder), num_test=None))
    check_splits(dm, train=stories[:30], val=[], test=stories[30:])


def test_arrow_dataset_dict_folder_and_single_arrow_file(tmp_path, stories):
    import datasets

    folder = tmp_path / "saved"
    splits = {"train": stories[:30], "validation": stories[30:]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}).save_to_disk(folder)
    dm = prepared(config(tmp_path, source="arrow", path=str(folder), num_test=6, num_val=4))
    check_splits(dm, train=stories[:30], val=stories[36:], test=stories[30:36])

    single = tmp_path / "single"
    datasets.Dataset.from_dict({"text": stories, "n": list(range(40))}).save_to_disk(single)
    (arrow_file,) = single.glob("*.arrow")
    dm = prepared(config(tmp_path, source="arrow", path=str(arrow_file), num_test=5))
    check_splits(dm, train=stories[5:], val=[], test=stories[:5])
    dm = prepared(config(tmp_path, source="arrow", path=str(single), num_test=5))  # a single saved Dataset
    check_splits(dm, train=stories[5:], val=[], test=stories[:5])


def test_hub_from_a_local_save_to_disk_folder_and_parquet_files(tmp_path, stories):
    import datasets

    train, valid = (
        datasets.Dataset.from_dict({"text": stories[:32]}),
        datasets.Dataset.from_dict({"text": stories[32:]}),
    )
    datasets.DatasetDict({"train": train, "validation": valid}).save_to_disk(tmp_path / "saved")
    dm = prepared(config(tmp_path, source="hub", path=str(tmp_path / "saved"), num_test=None))
    check_splits(dm, train=stories[:32], val=[], test=stories[32:])
    assert dm.label.startswith("TinyStories (hub format")

    # The hub's own layout: data/train-0000X-of-0000N-<hash>.parquet, data/validation-...parquet.
    data = tmp_path / "TinyStories" / "data"
    data.mkdir(parents=True)
    train.select(range(16)).to_parquet(data / "train-00000-of-00002-aaaa.parquet")
    train.select(range(16, 32)).to_parquet(data / "train-00001-of-00002-bbbb.parquet")
    valid.to_parquet(data / "validation-00000-of-00001-cccc.parquet")
    dm = prepared(config(tmp_path, source="hub", path=str(tmp_path / "TinyStories"), num_test=5, num_val=3))
    check_splits(dm, train=stories[:32], val=stories[37:], test=stories[32:37])


def test_hub_v2_downloads_the_gpt4_files(tmp_path, stories, monkeypatch):
    import huggingface_hub

    folder = write_v2_style(tmp_path / "hub", stories[:30], stories[30:], tuple(ts.V2_FILES.values()))
    calls = []

    def fake_download(repo_id, filename, repo_type=None, **kwargs):
        calls.append((repo_id, filename, repo_type))
        return str(folder / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    dm = prepared(config(tmp_path, source="hub_v2", num_test=None))
    check_splits(dm, train=stories[:30], val=[], test=stories[30:])
    assert sorted(calls) == sorted((ts.DEFAULT_HUB_ID, name, "dataset") for name in ts.V2_FILES.values())
    assert dm.label == f"TinyStories V2, GPT-4 stories ({ts.DEFAULT_HUB_ID})"

    def offline(*args, **kwargs):
        raise OSError("offline mode is enabled\nand more")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(UserError) as excinfo:
        TinyStoriesDataModule(config(tmp_path, source="hub_v2", num_test=None, num_real=3)).prepare_data()
    assert_one_line_user_error(excinfo, "TinyStoriesV2-GPT4-train.txt", "offline mode")
    with pytest.raises(UserError) as excinfo:
        TinyStoriesDataModule(config(tmp_path, source="hub_v2", path=str(folder))).prepare_data()
    assert_one_line_user_error(excinfo, "--data.source txt")


def test_an_unavailable_hub_id_is_a_one_line_error(tmp_path):
    dm = TinyStoriesDataModule(config(tmp_path, source="hub", path="nobody-here/no-such-dataset"))
    with pytest.raises(UserError) as excinfo:
        dm.prepare_data()
    assert_one_line_user_error(excinfo, "nobody-here/no-such-dataset", "--data.source stand_in")
    assert dm.label == "TinyStories (nobody-here/no-such-dataset)"


# ---- the frozen tokenizer ------------------------------------------------------------------------------------------
def test_a_run_dir_tokenizer_is_used_and_never_retrained(tmp_path, monkeypatch):
    first = prepared(config(tmp_path, num_real=20, num_test=5))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(first.tokenizer_file, run_dir / TOKENIZER_FILE)

    def no_training(*args, **kwargs):
        raise AssertionError("the tokenizer was retrained")

    monkeypatch.setattr(tok, "train_bpe", no_training)
    # A fresh cache (as on another machine): texts are rebuilt, the tokenizer is the run's.
    resumed = prepared(config(tmp_path, num_real=20, num_test=5, cache_dir=str(tmp_path / "cache2")), run_dir=run_dir)
    assert resumed.tokenizer_origin == "run_dir" and resumed.tokenizer_file == run_dir / TOKENIZER_FILE
    assert resumed.tokenizer_hash == first.tokenizer_hash
    assert not (resumed.cache_entry / TOKENIZER_FILE).exists()
    assert sorted(p.name for p in run_dir.iterdir()) == [TOKENIZER_FILE]  # nothing written into the run dir
    np.testing.assert_array_equal(resumed.train_dataset.tokens, first.train_dataset.tokens)
    # Another rank: setup only, same resolution.
    rank1 = TinyStoriesDataModule(resumed.config, run_dir=run_dir)
    rank1.setup("fit")
    assert rank1.tokenizer_origin == "run_dir" and len(rank1.train_dataset) == 20


def test_the_run_dir_tokenizer_wins_over_the_cached_one(tmp_path):
    first = prepared(config(tmp_path, num_real=20, num_test=5))
    other = tok.train_bpe(generate_stories(30, seed=99), vocab_size=VOCAB)
    tok.pad_vocab_to(other, VOCAB)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / TOKENIZER_FILE).write_text(other.to_str())
    resumed = prepared(config(tmp_path, num_real=20, num_test=5), run_dir=run_dir)
    assert resumed.cache_entry == first.cache_entry
    assert resumed.tokenizer_hash == tok.tokenizer_hash(other) != first.tokenizer_hash
    assert len(list(resumed.cache_entry.glob("tokens-*"))) == 2  # token arrays keyed by the tokenizer too
    text = resumed.train_texts(1)[0]
    assert resumed.train_dataset[0][1:-1].tolist() == other.encode(text).ids


def test_a_corrupt_or_mismatched_run_tokenizer_is_an_error(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / TOKENIZER_FILE).write_text("{not json")
    with pytest.raises(UserError) as excinfo:
        TinyStoriesDataModule(config(tmp_path, num_real=10, num_test=5), run_dir=run_dir).prepare_data()
    assert_one_line_user_error(excinfo, str(run_dir / TOKENIZER_FILE), "cannot be read")

    small = tok.train_bpe(generate_stories(10, seed=1), vocab_size=VOCAB)
    tok.pad_vocab_to(small, VOCAB)
    (run_dir / TOKENIZER_FILE).write_text(small.to_str())
    with pytest.raises(UserError) as excinfo:
        TinyStoriesDataModule(config(tmp_path, num_real=10, num_test=5, vocab_size=400), run_dir=run_dir).prepare_data()
    assert_one_line_user_error(excinfo, str(run_dir / TOKENIZER_FILE), "400")


def test_a_damaged_cache_tokenizer_is_an_error_naming_the_entry(tmp_path):
    dm = prepared(config(tmp_path, num_real=10, num_test=5))
    (dm.cache_entry / TOKENIZER_FILE).write_text("{}")
    with pytest.raises(UserError) as excinfo:
        TinyStoriesDataModule(dm.config).prepare_data()
    assert_one_line_user_error(excinfo, "damaged cache file", f"delete {dm.cache_entry}")


def test_the_cache_key_follows_the_data_identity(tmp_path):
    def entry(**kwargs) -> Path:
        return TinyStoriesDataModule(config(tmp_path, **kwargs)).cache_entry

    base = {"num_real": 10, "num_test": 5}
    assert entry(**base) == entry(**base)
    changed = [
        {"num_real": 11},
        {"num_test": 6},
        {"num_val": 1},
        {"vocab_size": VOCAB + 1},
        {"max_seq_len": 100},
        {"strict_utf8": True},
        {"stand_in_seed": 1},
        {"stand_in_stories": 100},
    ]
    keys = {entry(**{**base, **change}) for change in changed} | {entry(**base)}
    assert len(keys) == len(changed) + 1

    path = write_corpus(tmp_path / "a.txt", 20, seed=1)
    txt = {"source": "txt", "path": str(path), "num_test": 5}
    before = entry(**txt)
    assert entry(**txt, text_field="story") == before  # the text field means nothing to txt
    write_corpus(path, 21, seed=1)  # the file changes: new size (and mtime)
    resized = entry(**txt)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: the same content
    assert entry(**txt) == resized != before
    # Edited in place to the same size, its times put back (touch -r, a copy that keeps them): a new entry.
    text = path.read_text()
    assert "cat" in text
    path.write_text(text.replace("cat", "zqx"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert path.stat().st_size == stat.st_size
    assert len({before, resized, entry(**txt)}) == 3
    identity = json.loads(json.dumps(ts.data_identity(config(tmp_path, **txt))))
    assert identity["files"][0][0] == "a.txt" and identity["path"] == str(path.resolve())


# ---- the cache --------------------------------------------------------------------------------------------------
def test_a_second_preparation_reuses_the_cached_texts_and_tokens(tmp_path, monkeypatch):
    first = prepared(config(tmp_path, num_real=15, num_val=2, num_test=5))

    def fail(*args, **kwargs):
        raise AssertionError("the cache was not reused")

    monkeypatch.setattr(tok, "encode_stories", fail)
    monkeypatch.setattr(tok, "train_bpe", fail)
    monkeypatch.setattr(ts, "iter_stories", fail)
    again = prepared(config(tmp_path, num_real=15, num_val=2, num_test=5))
    assert again.tokenizer_origin == "cache" and again.tokenizer_hash == first.tokenizer_hash
    assert again.data_stats == {**first.data_stats, "tokenizer_origin": "cache"}
    check_splits(again, first.train_texts(), first.val_texts(), first.test_texts())
    assert isinstance(again.train_dataset.tokens, np.memmap) and again.train_dataset.tokens.dtype == np.uint16
    offsets = np.load(again.train_dataset.offsets_file)
    assert offsets.dtype == np.int64 and offsets.shape == (16,) and offsets[0] == 0
    assert offsets[-1] == again.train_dataset.tokens.shape[0] == again.data_stats["train_tokens"]
    identity = json.loads((again.cache_entry / "identity.json").read_text())
    assert identity["num_real"] == 15 and identity["source"] == "stand_in"


def test_setup_on_another_process_loads_what_one_process_prepared(tmp_path):
    cfg = config(tmp_path, num_real=12, num_test=4)
    with pytest.raises(UserError) as excinfo:
        TinyStoriesDataModule(cfg).setup("fit")
    assert_one_line_user_error(excinfo, "prepare_data")
    rank0 = prepared(cfg)
    rank1 = TinyStoriesDataModule(cfg)
    rank1.setup("fit")
    rank1.setup("test")  # idempotent
    assert rank1.tokenizer_hash == rank0.tokenizer_hash and rank1.tokenizer_origin == "cache"
    assert rank1.data_stats["train_stories"] == 12
    assert torch.equal(rank1.train_dataset[3], rank0.train_dataset[3])
    assert rank1.val_dataset is None and rank1.val_dataloader() == []


def test_datasets_pickle_as_file_names(tmp_path):
    dm = prepared(config(tmp_path, num_real=12, num_test=4))
    data = pickle.dumps(dm.train_dataset)
    assert len(data) < 1000  # no token data inside
    copy = pickle.loads(data)
    assert torch.equal(copy[-1], dm.train_dataset[11])
    with pytest.raises(IndexError):
        copy[12]


# ---- items, synthetic sets, batches -------------------------------------------------------------------------------
def test_collate_pads_to_the_longest_story_with_masks_and_ignored_labels():
    items = [torch.tensor([0, 5, 6, 0]), torch.tensor([0, 7, 0]), torch.tensor([0, 8, 9, 10, 11, 0])]
    batch = collate_stories(items)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(v.shape == (3, 6) and v.dtype == torch.int64 for v in batch.values())
    assert batch["input_ids"][1].tolist() == [0, 7, 0, PAD_ID, PAD_ID, PAD_ID]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0]
    assert batch["labels"][1].tolist() == [0, 7, 0, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["labels"][2].tolist() == [0, 8, 9, 10, 11, 0]  # the longest row has no padding
    with pytest.raises(ValueError):
        collate_stories([])


def store_like(
    items: list[torch.Tensor], tmp_path: Path, width: int, extra: int = 0, flat: bool = False
) -> dict[str, np.ndarray]:
    """What the sampler draws for these stories: PAD-padded uint16 rows, int32 lengths, finished flags, as memmaps;
    ``flat``: the tokens as the store keeps them (the stories back to back, without padding)."""
    tokens = np.full((len(items), width), PAD_ID, dtype=np.uint16)
    for row, item in enumerate(items):
        tokens[row, : len(item)] = item.numpy()
    if flat:
        tokens = np.concatenate([item.numpy().astype(np.uint16) for item in items])
    arrays = {
        "tokens": tokens,
        "lengths": np.array([len(item) + extra for item in items], dtype=np.int32),
        "finished": np.ones(len(items), dtype=bool),
    }
    for name, array in arrays.items():
        np.save(tmp_path / f"{name}.npy", array)
    return {name: np.load(tmp_path / f"{name}.npy", mmap_mode="r") for name in arrays}


@pytest.mark.parametrize("flat", [False, True])
def test_synthetic_items_look_exactly_like_real_ones(tmp_path, flat):
    dm = prepared(config(tmp_path, num_real=12, num_test=4))
    real = dm.train_dataset
    items = [real[i] for i in range(len(real))]
    arrays = store_like(items, tmp_path, width=max(map(len, items)) + 7, flat=flat)
    synthetic = dm.synthetic_dataset(arrays)
    assert len(synthetic) == len(real)
    for i in range(len(real)):
        assert torch.equal(synthetic[i], real[i]) and synthetic[i].dtype == real[i].dtype
    rows = [3, 0, 11, 3]
    assert all(torch.equal(a, b) for a, b in zip(synthetic.__getitems__(rows), real.__getitems__(rows)))
    real_batch = collate_stories(real.__getitems__(rows))
    synthetic_batch = dm.collate_fn(synthetic.__getitems__(rows))
    assert all(torch.equal(real_batch[k], synthetic_batch[k]) for k in real_batch)
    assert torch.equal(synthetic[-1], real[11])


@pytest.mark.parametrize("flat", [False, True])
def test_synthetic_sets_pickle_as_file_names_and_unmapped_tokens_as_data(tmp_path, flat):
    dm = prepared(config(tmp_path, num_real=12, num_test=4))
    items = [dm.train_dataset[i] for i in range(12)]
    arrays = store_like(items, tmp_path, width=max(map(len, items)) + 7, flat=flat)
    mapped = dm.synthetic_dataset(arrays)
    in_memory = dm.synthetic_dataset({name: np.array(array) for name, array in arrays.items()})
    token_bytes = arrays["tokens"].nbytes
    assert len(pickle.dumps(mapped)) < len(pickle.dumps(in_memory)) - token_bytes // 2  # the name, not the tokens
    for copy in (pickle.loads(pickle.dumps(mapped)), pickle.loads(pickle.dumps(in_memory))):
        assert all(torch.equal(copy[i], items[i]) for i in range(12))
    assert isinstance(pickle.loads(pickle.dumps(mapped)).stories.tokens, np.memmap)


@pytest.mark.parametrize("flat", [False, True])
def test_synthetic_stories_are_truncated_to_max_seq_len(tmp_path, flat):
    dm = prepared(config(tmp_path, num_real=6, num_test=2, max_seq_len=LONG))
    items = [dm.train_dataset[i] for i in range(6)]
    short = TinyStoriesDataModule(config(tmp_path, num_real=6, num_test=2, max_seq_len=10))
    synthetic = short.synthetic_dataset(store_like(items, tmp_path, width=max(map(len, items)), flat=flat))
    assert [len(x) for x in synthetic.__getitems__(range(6))] == [10] * 6
    assert torch.equal(synthetic[2], items[2][:10])


@pytest.mark.parametrize(
    "arrays, fragment",
    [
        ({"samples": np.zeros((3, 5), np.uint16)}, "'tokens' and 'lengths'"),
        ({"tokens": np.zeros((4,), np.uint16), "lengths": np.ones(3, np.int32)}, "the lengths sum to 3"),
        ({"tokens": np.zeros((3, 5, 1), np.uint16), "lengths": np.ones(3, np.int32)}, "(n, L)"),
        ({"tokens": np.zeros((3,), np.uint16), "lengths": np.array([0, 1, 2], np.int32)}, ">= 1"),
        ({"tokens": np.zeros((3, 5), np.float32), "lengths": np.ones(3, np.int32)}, "(n, L)"),
        ({"tokens": np.zeros((3, 5), np.uint16), "lengths": np.ones(4, np.int32)}, "(3,)"),
        ({"tokens": np.zeros((3, 5), np.uint16), "lengths": np.array([1, 6, 2], np.int32)}, "1..5"),
        ({"tokens": np.zeros((3, 5), np.uint16), "lengths": np.array([0, 1, 2], np.int32)}, "1..5"),
        (
            {"tokens": np.zeros((3, 5), np.uint16), "lengths": np.ones(3, np.int32), "finished": np.ones(2, bool)},
            "(3,)",
        ),
        ({"tokens": np.array([0, 5, 0, 8192, 0], np.uint16), "lengths": np.array([2, 3])}, "got id 8192"),
        ({"tokens": np.array([[0, 5, 1], [0, 9000, 1]], np.uint16), "lengths": np.array([2, 3])}, "got id 9000"),
    ],
)
def test_bad_synthetic_arrays_are_one_line_errors(arrays, fragment):
    with pytest.raises(UserError) as excinfo:
        TinyStoriesDataModule(TinyStoriesDataConfig()).synthetic_dataset(arrays)
    assert_one_line_user_error(excinfo, fragment)


@pytest.mark.parametrize("flat", [True, False])
def test_synthetic_ids_are_checked_against_the_vocabulary_of_the_story_tokens_only(flat):
    """Ids below the vocabulary size pass; in padded rows only the story tokens count, not what follows them."""
    vocab = TinyStoriesDataConfig().vocab_size
    dm = TinyStoriesDataModule(TinyStoriesDataConfig())
    if flat:
        tokens, lengths = np.array([0, vocab - 1, 0, 7], np.uint16), np.array([2, 2])
    else:  # beyond each length: ids the check must not read
        tokens, lengths = np.array([[0, vocab - 1, vocab + 3], [0, 7, vocab + 9]], np.uint16), np.array([2, 2])
    stories = dm.synthetic_dataset({"tokens": tokens, "lengths": lengths})
    assert stories.stories.max_id(chunk=2) == vocab - 1  # several chunks read
    assert [s.tolist() for s in stories] == [[0, vocab - 1], [0, 7]]


def test_first_tokens_texts_and_loaders(tmp_path, monkeypatch):
    dm = prepared(config(tmp_path, num_real=10, num_val=3, num_test=4))
    firsts = dm.first_tokens()
    assert firsts.dtype == np.int64 and firsts.tolist() == [int(dm.train_dataset[i][1]) for i in range(10)]
    assert dm.train_texts(3) == dm.train_texts()[:3]
    monkeypatch.setattr(ts, "_ENCODE_CHUNK", 3)  # the stream crosses chunk boundaries
    streamed = dm.iter_train_texts()
    assert not isinstance(streamed, list) and list(streamed) == dm.train_texts() and dm.num_train_texts() == 10
    batches = list(dm.train_dataloader())
    assert sum(b["input_ids"].shape[0] for b in batches) == 10
    for batch in batches:
        mask = batch["attention_mask"]
        assert torch.equal(mask.sum(1), (batch["labels"] != IGNORE_INDEX).sum(1))
        assert batch["input_ids"].shape[1] == int(mask.sum(1).max())  # padded to the longest story only
    assert len(next(iter(dm.val_dataloader()))["input_ids"]) == 3
    assert sum(len(b["input_ids"]) for b in dm.test_dataloader()) == 4


def test_the_generation_data_module_mixes_real_and_synthetic_stories(tmp_path):
    real = TinyStoriesDataModule(config(tmp_path, num_real=8, num_test=4))
    store = GenerationStore(tmp_path / "store")
    real.prepare_data()
    real.setup("fit")
    items = [real.train_dataset[i] for i in range(8)]
    arrays = store_like(items, tmp_path, width=max(map(len, items)))
    for name, array in arrays.items():
        store.save_array(0, name, np.asarray(array))
    store.commit(0, num_samples=8, sampling={}, sample_arrays=list(arrays))
    dm = SyntheticAccumulatingDataModule(real, "accumulate", store, generation=1, batch_size=4)
    dm.setup("fit")
    assert dm.train_composition() == {"train_size": 16, "train_real": 8, "train_synthetic": 8}
    batches = list(dm.train_dataloader())
    assert sum(b["input_ids"].shape[0] for b in batches) == 16
    assert all(b["input_ids"].dtype == torch.int64 and b["input_ids"][:, 0].eq(EOT_ID).all() for b in batches)
    assert next(iter(dm.test_dataloader()))["input_ids"].shape[0] == 4


# ---- bad input ---------------------------------------------------------------------------------------------------
def test_empty_stories_are_dropped_and_counted(tmp_path, stories, caplog):
    text = f"\n<|endoftext|>\n{stories[0]}\n<|endoftext|>\n   \n<|endoftext|>\n{stories[1]}\n<|endoftext|>\n"
    text += format_corpus(stories[2:12])
    path = tmp_path / "holes.txt"
    path.write_text(text)
    with caplog.at_level(logging.WARNING, logger="datamodules.tinystories"):
        dm = prepared(config(tmp_path, source="txt", path=str(path), num_test=3))
    check_splits(dm, train=stories[3:12], val=[], test=stories[:3])
    assert dm.data_stats["empty_dropped"] == 2 and dm.data_stats["stories_read"] == 14
    assert "dropped 2 empty stories" in caplog.text and str(path) in caplog.text


def test_undecodable_bytes_are_replaced_and_counted_or_refused_when_strict(tmp_path, stories, caplog):
    good = format_corpus(stories[:10]).encode()
    bad_at = len(format_corpus(stories[:4]).encode()) + 5  # inside story 4
    data = good[:bad_at] + b"\xff\xfe" + good[bad_at:]
    path = tmp_path / "damaged.txt"
    path.write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="datamodules.tinystories"):
        dm = prepared(config(tmp_path, source="txt", path=str(path), num_test=2))
    assert dm.data_stats["bytes_replaced"] == 2
    damaged = dm.train_texts()[2]
    assert damaged == stories[4][:5] + "\ufffd\ufffd" + stories[4][5:]
    assert "replaced 2 undecodable bytes" in caplog.text
    assert tok.decode(dm.tokenizer, dm.train_dataset[2][1:-1].tolist()) == damaged

    with pytest.raises(UserError) as excinfo:
        TinyStoriesDataModule(
            config(tmp_path, source="txt", path=str(path), num_test=2, strict_utf8=True)
        ).prepare_data()
    assert_one_line_user_error(excinfo, str(path), f"byte offset {bad_at}")

    jsonl = tmp_path / "damaged.jsonl"
    raw = b'{"text": "fine"}\n{"text": "bro\xc3ken"}\n'
    jsonl.write_bytes(raw)
    with pytest.raises(UserError) as excinfo:
        TinyStoriesDataModule(
            config(tmp_path, source="jsonl", path=str(jsonl), num_test=1, strict_utf8=True)
        ).prepare_data()
    assert_one_line_user_error(excinfo, str(jsonl), f"byte offset {raw.index(0xC3)}", "line 2")


def test_stories_longer_than_max_seq_len_are_truncated_and_counted(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="datamodules.tinystories"):
        dm = prepared(config(tmp_path, num_real=10, num_test=3, max_seq_len=50))
    full = [[EOT_ID, *dm.tokenizer.encode(text).ids, EOT_ID] for text in dm.train_texts()]
    expected = sum(len(ids) > 50 for ids in full)
    assert expected > 0 and dm.data_stats["train_truncated"] == expected
    assert dm.data_stats["truncated"] == expected + dm.data_stats["test_truncated"]
    for i, ids in enumerate(full):
        assert dm.train_dataset[i].tolist() == ids[:50]
    assert "truncated" in caplog.text


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("", "no non-empty stories (no stories)"),
        ("\n<|endoftext|>\n  \n<|endoftext|>\n", "all 2 stories read are empty"),
        ("one long line without any separator\n", "no <|endoftext|> separator line"),
    ],
)
def test_corpora_without_stories_are_errors(tmp_path, content, fragment):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(UserError) as excinfo:
        TinyStoriesDataModule(config(tmp_path, source="txt", path=str(path), num_test=1)).prepare_data()
    assert_one_line_user_error(excinfo, fragment)


def test_missing_files_and_folders_are_errors(tmp_path, stories):
    for source in ("txt", "jsonl", "arrow"):
        with pytest.raises(UserError) as excinfo:
            TinyStoriesDataModule(config(tmp_path, source=source, path=str(tmp_path / "nope"))).prepare_data()
        assert_one_line_user_error(excinfo, "nope", "no such file or directory")
    with pytest.raises(UserError) as excinfo:
        TinyStoriesDataModule(config(tmp_path, source="hub", path=str(tmp_path / "nope"))).prepare_data()
    assert_one_line_user_error(excinfo, "no such directory")

    folder = tmp_path / "only-train"
    folder.mkdir()
    (folder / "TinyStories-train.txt").write_text(format_corpus(stories[:5]))
    with pytest.raises(UserError) as excinfo:
        TinyStoriesDataModule(config(tmp_path, source="txt", path=str(folder))).prepare_data()
    assert_one_line_user_error(excinfo, "no *valid*.txt")
    (folder / "TinyStoriesV2-GPT4-train.txt").write_text(format_corpus(stories[:5]))
    with pytest.raises(UserError) as excinfo:
        TinyStoriesDataModule(config(tmp_path, source="txt", path=str(folder))).prepare_data()
    assert_one_line_user_error(excinfo, "several files match *train*.txt")

    empty = tmp_path / "empty-folder"
    empty.mkdir()
    for source in ("hub", "arrow"):
        with pytest.raises(UserError) as excinfo:
            TinyStoriesDataModule(config(tmp_path, source=source, path=str(empty))).prepare_data()
        assert_one_line_user_error(excinfo, "neither a saved dataset")


def test_malformed_jsonl_names_the_file_and_line(tmp_path, stories):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": stories[0]}), json.dumps({"text": stories[1]}), '{"text": "unterminated', "{}"]
    cases = {
        "not valid JSON": lines[:3],
        "no 'text' field": [lines[0], lines[1], json.dumps({"story": "x", "id": 1})],
        "is int, not text": [lines[0], lines[1], json.dumps({"text": 7})],
        "expected a JSON object": [lines[0], lines[1], "[1, 2]"],
    }
    for fragment, content in cases.items():
        path.write_text("\n".join(content) + "\n")
        with pytest.raises(UserError) as excinfo:
            TinyStoriesDataModule(config(tmp_path, source="jsonl", path=str(path), num_test=1)).prepare_data()
        assert_one_line_user_error(excinfo, str(path), "line 3", fragment)


def test_a_missing_or_non_text_column_is_an_error(tmp_path, stories):
    import datasets

    folder = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"story": stories[:10], "n": list(range(10))})}
    ).save_to_disk(folder)
    with pytest.raises(UserError) as excinfo:
        TinyStoriesDataModule(config(tmp_path, source="arrow", path=str(folder), num_test=2)).prepare_data()
    assert_one_line_user_error(excinfo, "no 'text' column", "story")
    with pytest.raises(UserError) as excinfo:
        TinyStoriesDataModule(
            config(tmp_path, source="arrow", path=str(folder), num_test=2, text_field="n")
        ).prepare_data()
    assert_one_line_user_error(excinfo, "'n'", "not text")
    dm = prepared(config(tmp_path, source="arrow", path=str(folder), num_test=2, text_field="story"))
    assert dm.train_texts() == stories[2:10]


def test_too_few_stories_for_the_requested_sizes_are_errors(tmp_path, stories):
    folder = write_v2_style(tmp_path / "raw", stories[:20], stories[20:30])
    cases = [
        ({"num_real": 21, "num_test": None}, "--data.num_real 21 is larger than the 20"),
        ({"num_test": 9, "num_val": 2}, "too few for --data.num_test 9 + --data.num_val 2"),
        ({"num_test": None, "num_val": 10}, "too few"),
    ]
    for kwargs, fragment in cases:
        with pytest.raises(UserError) as excinfo:
            TinyStoriesDataModule(config(tmp_path, source="txt", path=str(folder), **kwargs)).prepare_data()
        assert_one_line_user_error(excinfo, fragment)
    single = write_corpus(tmp_path / "one.txt", 10, seed=1)
    cases = [
        ({"num_real": 8, "num_test": 3}, "too few for --data.num_test 3 + --data.num_val 0 + --data.num_real 8"),
        ({"num_test": 10}, "at least 1 training story"),
        ({"num_test": None}, "has no validation split"),
    ]
    for kwargs, fragment in cases:
        with pytest.raises(UserError) as excinfo:
            TinyStoriesDataModule(config(tmp_path, source="txt", path=str(single), **kwargs)).prepare_data()
        assert_one_line_user_error(excinfo, str(single), fragment)
    assert not list((tmp_path / "cache").rglob("*.utf8"))  # a failed preparation leaves no cached texts


def test_reading_and_tokenizer_training_show_progress_lines(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("collapse.progress._interval", 0.0)  # --progress_every 0: a line for every story
    with caplog.at_level(logging.INFO, logger="collapse.progress"):
        prepared(config(tmp_path, num_real=12, num_val=4, num_test=4))
    lines = [r.getMessage() for r in caplog.records if r.name == "collapse.progress"]
    reading = [m for m in lines if m.startswith("reading the train split")]
    assert reading[0].startswith("reading the train split: 1/12 stories") and "ETA" in reading[0]
    assert reading[-1].startswith("reading the train split: done, 12 stories")
    training = [m for m in lines if m.startswith("training the tokenizer on the train split")]
    assert training and training[-1].startswith("training the tokenizer on the train split: done, 12 stories")

"""Tests of the frozen byte-level BPE tokenizer (datamodules/tokenizer.py)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from collapse.errors import UserError
from datamodules.story_corpus import generate_stories
from datamodules.tokenizer import (
    EOT,
    EOT_ID,
    PAD,
    PAD_ID,
    TOKENIZER_FILE,
    clean_stories,
    decode,
    encode_stories,
    load_or_train,
    pad_vocab_to,
    read_text_lenient,
    read_text_strict,
    to_token_stream,
    to_transformers,
    tokenizer_hash,
    train_bpe,
)

VOCAB = 1000

NON_ASCII = [
    'Lily said, "Hello!" and ran to the park.',
    "Café déjà vu: naïve Zoë ate crème brûlée.",
    "The dog 🐶 saw a rocket 🚀 and smiled 😀.",
    "小猫很开心。她喜欢在花园里玩。",
    "  leading spaces, tabs\tand\nnewlines  ",
]


@pytest.fixture(scope="module")
def stories() -> list[str]:
    """The stand-in corpus tests train on (generated once per module: it takes a fraction of a second)."""
    return generate_stories(2000, seed=0)


@pytest.fixture(scope="module")
def tok(stories):
    """A small BPE trained on the stand-in stories."""
    return train_bpe(stories, vocab_size=VOCAB)


def _pseudo_words(n_docs: int, seed: int = 0) -> list[str]:
    """Documents of Zipf-distributed random syllable words: far more distinct pairs than the stand-in corpus."""
    rng = np.random.default_rng(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    lexicon = ["".join(rng.choice(syllables, size=rng.integers(1, 5))) for _ in range(30000)]
    weights = 1.0 / np.arange(1, len(lexicon) + 1) ** 1.05
    picks = rng.choice(len(lexicon), size=(n_docs, 60), p=weights / weights.sum())
    return [" ".join(lexicon[i] for i in row) for row in picks]


def test_reaches_requested_vocab_and_special_ids(tok):
    """2,000 stand-in stories are enough for 1,000 tokens; EOT and PAD get ids 0 and 1."""
    assert tok.get_vocab_size() == VOCAB
    assert tok.token_to_id(EOT) == EOT_ID == 0
    assert tok.token_to_id(PAD) == PAD_ID == 1


def test_full_8000_vocab_on_diverse_corpus():
    """8,000 tokens are reached (in seconds) when the corpus has enough distinct pairs."""
    docs = _pseudo_words(20000)
    start = time.perf_counter()
    tokenizer = train_bpe(docs, vocab_size=8000)
    assert time.perf_counter() - start < 10
    assert tokenizer.get_vocab_size() == 8000


def test_short_corpus_is_padded_to_requested_size(tmp_path, stories):
    """The stand-in corpus cannot give 8,000 tokens: load_or_train pads with reserved special tokens."""
    raw = train_bpe(stories[:300], vocab_size=8000)
    assert raw.get_vocab_size() < 8000
    tokenizer = load_or_train(tmp_path, lambda: stories[:300], vocab_size=8000)
    assert tokenizer.get_vocab_size() == 8000
    # Padding changes no encoding of ordinary text, and decoding skips the reserved tokens.
    text = stories[500]
    assert tokenizer.encode(text).ids == raw.encode(text).ids
    assert decode(tokenizer, [0, 7999, *raw.encode(text).ids]) == text
    assert pad_vocab_to(tokenizer, 8000) == 0
    with pytest.raises(UserError):
        pad_vocab_to(tokenizer, 100)


def test_unpadded_short_tokenizer_is_kept_at_its_size(tmp_path, stories):
    """Without padding, a short tokenizer is saved as is and loads again at the same requested size."""
    first = load_or_train(tmp_path, lambda: stories[:300], vocab_size=8000, pad=False)
    assert first.get_vocab_size() < 8000
    again = load_or_train(tmp_path, lambda: [], vocab_size=8000, pad=False)
    assert tokenizer_hash(again) == tokenizer_hash(first)


def test_deterministic(stories, tok):
    """Same texts in the same order give byte-identical JSON."""
    assert train_bpe(stories, vocab_size=VOCAB).to_str() == tok.to_str()


def test_frozen_after_first_training(tmp_path, stories):
    """A second call with different texts loads the saved tokenizer and never calls the factory."""
    first = load_or_train(tmp_path, lambda: stories, vocab_size=VOCAB)
    assert (tmp_path / TOKENIZER_FILE).is_file()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != TOKENIZER_FILE]
    assert leftovers == []  # atomic write left no temporary file

    def must_not_be_called():
        raise AssertionError("factory called for a frozen tokenizer")

    second = load_or_train(tmp_path, must_not_be_called, vocab_size=VOCAB)
    assert tokenizer_hash(second) == tokenizer_hash(first)
    assert len(tokenizer_hash(first)) == 64
    # Different texts WOULD have given a different tokenizer: the hash really tells them apart.
    other = train_bpe(generate_stories(500, seed=9), vocab_size=VOCAB)
    assert tokenizer_hash(other) != tokenizer_hash(first)


def test_size_mismatch_is_user_error(tmp_path, stories):
    """A stored tokenizer of another size is refused, naming the file and both sizes."""
    load_or_train(tmp_path, lambda: stories, vocab_size=VOCAB)
    with pytest.raises(UserError, match=rf"{TOKENIZER_FILE}.*{VOCAB}.*1200"):
        load_or_train(tmp_path, lambda: stories, vocab_size=1200)


@pytest.mark.parametrize("content", ["{not json", "", '{"version": "1.0"}'])
def test_corrupt_file_is_user_error(tmp_path, content):
    """An unreadable tokenizer.json is a one-line UserError naming the file, not a silent retrain."""
    path = tmp_path / TOKENIZER_FILE
    path.write_text(content)
    with pytest.raises(UserError, match=TOKENIZER_FILE) as info:
        load_or_train(tmp_path, lambda: ["never used"], vocab_size=VOCAB)
    assert "\n" not in str(info.value)
    assert path.read_text() == content  # left untouched


@pytest.mark.parametrize("text", NON_ASCII)
def test_round_trip_any_utf8(tok, text):
    """decode(encode(s)) == s for ASCII and non-ASCII text, with no special or unknown tokens."""
    ids = tok.encode(text).ids
    assert all(i > PAD_ID for i in ids)
    assert decode(tok, ids) == text


def test_encode_stories_wraps_in_eot(tok, stories):
    """Each story is [EOT] + ids + [EOT]; without add_eos only the leading EOT."""
    sample = stories[:5] + NON_ASCII[:2]
    encoded = encode_stories(tok, sample, batch_size=3)
    assert len(encoded) == len(sample)
    for text, ids in zip(sample, encoded):
        assert ids[0] == ids[-1] == EOT_ID
        assert EOT_ID not in ids[1:-1]
        assert ids[1:-1] == tok.encode(text).ids
        assert decode(tok, ids) == text
    no_eos = encode_stories(tok, sample, add_eos=False)
    assert [ids[:-1] for ids in encoded] == no_eos


def test_empty_stories_counted(tok):
    """Blank stories are dropped with a count; passing one to encode_stories is an error."""
    kept, dropped = clean_stories(["  a story  ", "", "   \n\t", "another"])
    assert kept == ["a story", "another"]
    assert dropped == 2
    with pytest.raises(UserError, match="story 1 is empty"):
        encode_stories(tok, ["fine", " "])


def test_token_stream_dtype(tok, stories):
    """A vocab that fits gives a flat uint16 stream; ids past 65,535 give int32."""
    encoded = encode_stories(tok, stories[:10])
    stream = to_token_stream(encoded, vocab_size=tok.get_vocab_size())
    assert stream.dtype == np.uint16
    assert stream.tolist() == [i for ids in encoded for i in ids]
    assert to_token_stream(encoded).dtype == np.uint16
    assert to_token_stream([[0, 70000]]).dtype == np.int32
    assert to_token_stream([[1]], vocab_size=100000).dtype == np.int32


def test_read_text_lenient_and_strict(tmp_path):
    """Lenient reading replaces and counts bad bytes; strict reading names the file and byte offset."""
    path = tmp_path / "bad.txt"
    path.write_bytes("héllo ".encode() + b"\xff\xfe" + b" world")
    text, n = read_text_lenient(path)
    assert n == 2
    assert text == "héllo \ufffd\ufffd world"
    with pytest.raises(UserError, match=r"bad\.txt.*offset 7"):
        read_text_strict(path)
    good = tmp_path / "good.txt"
    good.write_text("小猫 🐶\n", encoding="utf-8")
    assert read_text_lenient(good) == ("小猫 🐶\n", 0)
    assert read_text_strict(good) == "小猫 🐶\n"


def test_transformers_wrapper_matches_raw(tok, stories):
    """The PreTrainedTokenizerFast wrapper gives the same ids and the right special tokens."""
    hf = to_transformers(tok)
    assert hf.bos_token == hf.eos_token == EOT
    assert hf.pad_token == PAD
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (EOT_ID, EOT_ID, PAD_ID)
    for text in stories[:3] + NON_ASCII:
        assert hf(text)["input_ids"] == tok.encode(text).ids
        assert hf.decode(tok.encode(text).ids) == text
    # Wrapping left the frozen tokenizer unchanged.
    assert tok.get_vocab_size() == VOCAB


def test_a_saved_transformers_wrapper_encodes_alike_and_a_changed_merge_does_not(tmp_path, tok, stories):
    import json
    import types

    from tokenizers import Tokenizer

    from datamodules.tokenizer import encodes_alike, to_transformers
    from recipes.tinystories import check_checkpoint_tokenizer

    folder = tmp_path / "model"
    to_transformers(tok).save_pretrained(folder)  # what a checkpoint exported from a run holds
    saved = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert encodes_alike(saved, tok) and saved.encode(stories[0]).ids == tok.encode(stories[0]).ids
    check_checkpoint_tokenizer(types.SimpleNamespace(init_from=str(folder)), tok)  # accepted

    other = json.loads(tok.to_str())
    other["model"]["merges"] = other["model"]["merges"][:-1]  # one merge fewer: another tokenizer
    (folder / "tokenizer.json").write_text(json.dumps(other), encoding="utf-8")
    assert not encodes_alike(Tokenizer.from_file(str(folder / "tokenizer.json")), tok)
    with pytest.raises(UserError, match="encodes text otherwise than this run's tokenizer") as err:
        check_checkpoint_tokenizer(types.SimpleNamespace(init_from=str(folder)), tok)
    assert "\n" not in str(err.value)

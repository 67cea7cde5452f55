"""Calibration sources (embedded Wikipedia, files, hub names) and seeded non-overlapping token windows."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import numpy as np
import pytest

from modegpt_jax import calibration as cal
from modegpt_jax import wikipedia as wk
from modegpt_jax.errors import UserError

# --------------------------------------------------------------------------- a tiny tokenizer

WORDS = [f"w{k}" for k in range(1000)]
TEXT = " ".join(WORDS)  # 1000 tokens, ids strictly increasing along the stream


def _tokenizer(words):
    """A word-level fast tokenizer over ``words`` (one token per whitespace/punctuation word)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer(WORDS)


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


def _stream(tokenizer, text=TEXT):
    return cal.calibration_tokens(tokenizer, text)


# --------------------------------------------------------------------------- windows


def test_shape_dtype_and_genuine_non_overlapping_slices(tokenizer, text_file):
    stream = _stream(tokenizer)
    assert len(stream) == 1000
    windows = cal.calibration_windows(tokenizer, text_file, 7, 64, seed=0)
    assert windows.shape == (7, 64) and windows.dtype == np.int32
    spans = []
    for row in windows:
        start = int(np.flatnonzero(stream == row[0])[0])  # ids are unique along this stream
        np.testing.assert_array_equal(row, stream[start : start + 64])
        spans.append((start, start + 64))
    spans.sort()
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))


def test_same_seed_same_windows_other_seed_differs(tokenizer, text_file):
    a = cal.calibration_windows(tokenizer, text_file, 5, 32, seed=3)
    b = cal.calibration_windows(tokenizer, text_file, 5, 32, seed=3)
    c = cal.calibration_windows(tokenizer, text_file, 5, 32, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_exactly_enough_tokens_uses_every_slot(tokenizer):
    stream = _stream(tokenizer)
    windows = cal.sample_windows(stream, 10, 100, seed=1)
    np.testing.assert_array_equal(np.sort(windows.reshape(-1)), stream)


def test_random_offsets_spread_over_the_stream():
    stream = np.arange(1000, dtype=np.int32)
    starts = {int(cal.sample_windows(stream, 1, 30, seed=s)[0, 0]) for s in range(40)}
    assert len(starts) > 20
    assert any(start % 30 for start in starts)  # not only the slot grid from 0


def test_too_little_text_names_the_counts_and_the_fixes(tokenizer, text_file):
    with pytest.raises(UserError) as info:
        cal.calibration_windows(tokenizer, text_file, 8, 128, seed=0)
    message = str(info.value)
    assert "1000 tokens" in message and "1024" in message
    assert "calib_samples" in message and "calib_seqlen" in message and "more text" in message
    assert "\n" not in message and "--" not in message  # settings, not flags: the CLI maps them
    from modegpt_jax.cli import flag_message

    flags = flag_message(info.value)
    assert "--calib-samples" in flags and "--calib-seqlen" in flags


@pytest.mark.parametrize(("n_samples", "seqlen"), [(0, 16), (2, 1), (-1, 16), (True, 16), (2, 2.5)])
def test_bad_sizes_are_user_errors(tokenizer, text_file, n_samples, seqlen):
    with pytest.raises(UserError, match=r"^(n_samples|seqlen) must be"):
        cal.calibration_windows(tokenizer, text_file, n_samples, seqlen, seed=0)


def test_documents_are_joined_by_a_blank_line_in_one_call(tokenizer):
    calls = []

    class Recording:
        def __call__(self, text, add_special_tokens=True):
            calls.append((text, add_special_tokens))
            return tokenizer(text, add_special_tokens=add_special_tokens)

    tokens = cal.calibration_tokens(Recording(), ["w1 w2", "w3"])
    assert calls == [("w1 w2\n\nw3", False)]
    np.testing.assert_array_equal(tokens, tokenizer("w1 w2 w3", add_special_tokens=False)["input_ids"])


def test_embedded_wikipedia_windows():
    text = wk.embedded_text("calibration")
    from tokenizers import pre_tokenizers

    words = {word for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)}
    tokenizer = _tokenizer(sorted(words))
    windows = cal.calibration_windows(tokenizer, "wikipedia", 4, 256, seed=0)
    assert windows.shape == (4, 256)
    assert (windows != 0).all()  # every word known: no [UNK]
    stream = cal.calibration_tokens(tokenizer, text)
    for row in windows:  # each window is a slice of the calibration stream
        starts = np.flatnonzero(stream[: len(stream) - 255] == row[0])
        assert any(np.array_equal(stream[s : s + 256], row) for s in starts)


# --------------------------------------------------------------------------- sources


def test_wikipedia_sources_are_the_calibration_and_validation_splits():
    assert cal.load_calibration_text("wikipedia") == wk.embedded_text("calibration")
    assert cal.load_calibration_text() == wk.embedded_text("calibration")
    assert cal.load_calibration_text("wikipedia-validation") == wk.embedded_text("validation")


@pytest.mark.parametrize("name", ["heldout", "wikipedia-heldout", "HeldOut"])
def test_heldout_is_refused(name):
    with pytest.raises(UserError, match=r"reserved for evaluation"):
        cal.load_calibration_text(name)


def test_calibration_and_heldout_text_do_not_share_articles():
    calibration = wk.embedded_text("calibration")
    validation = wk.embedded_text("validation")
    heldout_articles = wk.embedded_articles("heldout")
    assert heldout_articles
    calibration_titles = {a.title for a in wk.embedded_articles("calibration")}
    assert calibration_titles.isdisjoint(a.title for a in heldout_articles)
    for article in heldout_articles:  # the opening (title) paragraph of each held-out article
        opening = article.text[:200]
        assert opening not in calibration and opening not in validation, article.title
    # 200-character chunks of the held-out text: Wikipedia articles sometimes quote the same
    # sentence (e.g. two articles on appellate courts), so allow a handful, never whole articles.
    heldout = wk.embedded_text("heldout")
    chunks = [heldout[i : i + 200] for i in range(0, len(heldout) - 200, 200)]
    shared = sum(chunk in calibration or chunk in validation for chunk in chunks)
    assert shared <= max(2, len(chunks) // 500), shared


def test_unknown_source_lists_what_is_accepted():
    with pytest.raises(UserError) as info:
        cal.load_calibration_text("no-such-source")
    message = str(info.value)
    for word in ("wikipedia", "wikipedia-validation", ".txt", ".jsonl", ".parquet", "wikitext2", "ptb", "c4", "alpaca"):
        assert word in message


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(UserError, match=r"not found"):
        cal.load_calibration_text(str(tmp_path / "missing.txt"))
    other = tmp_path / "data.csv"
    other.write_text("a,b\n")
    with pytest.raises(UserError, match=r"unsupported extension.*\.txt"):
        cal.load_calibration_text(str(other))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(UserError, match=r"no text"):
        cal.load_calibration_text(str(empty))


def test_txt_file_is_read_as_utf8(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("\ufeffCafé ünïcode\n".encode("utf-8"))
    assert cal.load_calibration_text(str(path)) == "Café ünïcode\n"
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    with pytest.raises(UserError, match=r"UTF-8"):
        cal.load_calibration_text(str(bad))


def test_jsonl_fields_text_content_and_alpaca(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [
        {"text": "plain text", "content": "ignored"},
        {"content": "from content"},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert cal.load_calibration_text(str(path)) == [
        "plain text",
        "from content",
        "Add the numbers.\n2 and 3\n5",
        "Say hi.\nHi!",
    ]


def test_jsonl_bad_line_names_its_number(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"line 3 is not valid JSON"):
        cal.load_calibration_text(str(path))
    path.write_text('{"text": "ok"}\n{"title": "no text here"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"line 2: no text field"):
        cal.load_calibration_text(str(path))
    path.write_text('["a list"]\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"line 1: expected a JSON object"):
        cal.load_calibration_text(str(path))


def test_jsonl_windows(tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": " ".join(WORDS[k : k + 100])}) for k in range(0, 1000, 100)))
    windows = cal.calibration_windows(tokenizer, str(path), 4, 50, seed=2)
    assert windows.shape == (4, 50)
    stream = _stream(tokenizer)
    for row in windows:  # "\n\n" adds no token here, so the stream is the same as TEXT's
        start = int(np.flatnonzero(stream == row[0])[0])
        np.testing.assert_array_equal(row, stream[start : start + 50])


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow is not installed")
def test_parquet_text_column_else_first_string_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "title": ["t1", "t2", "t3"], "text": ["one", None, "three"]}), path)
    assert cal.load_calibration_text(str(path)) == ["one", "three"]
    path = tmp_path / "b.parquet"
    pq.write_table(pa.table({"id": [1, 2], "body": ["first", "second"], "note": ["x", "y"]}), path)
    assert cal.load_calibration_text(str(path)) == ["first", "second"]
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": [1, 2]}), path)
    with pytest.raises(UserError, match=r"no string column"):
        cal.load_calibration_text(str(path))
    path = tmp_path / "d.parquet"
    path.write_text("not parquet")
    with pytest.raises(UserError, match=r"cannot read parquet"):
        cal.load_calibration_text(str(path))


def test_parquet_without_pyarrow_names_pip(tmp_path, monkeypatch):
    path = tmp_path / "a.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(UserError, match=r"pip install pyarrow"):
        cal.load_calibration_text(str(path))


# --------------------------------------------------------------------------- hub data sets


def _fake_datasets(monkeypatch, load_dataset):
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)


@pytest.mark.parametrize("name", sorted(cal.HUB_DATASETS))
def test_offline_hub_is_a_one_line_user_error(monkeypatch, name):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'x' on the Hub (LocalEntryNotFoundError)\nsecond line")

    _fake_datasets(monkeypatch, offline)
    with pytest.raises(UserError) as info:
        cal.load_calibration_text(name)
    message = str(info.value)
    assert "\n" not in message
    assert repr(name) in message and cal.HUB_DATASETS[name].path in message
    assert "network" in message and "local" in message


def test_missing_datasets_package_names_pip(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UserError) as info:
        cal.load_calibration_text("wikitext2")
    message = str(info.value)
    assert "pip install datasets" in message and "wikitext" in message and "\n" not in message


def test_hub_arguments_and_fields(monkeypatch):
    calls = []
    tables = {
        "wikitext": {"text": ["", " = Title = \n", " Some text . \n"]},
        "ptb_text_only": {"sentence": ["a sentence", "another one"]},
        "allenai/c4": {"text": ["doc one", "doc two"], "url": ["u1", "u2"]},
        "tatsu-lab/alpaca": {"text": ["### Instruction: hi"], "instruction": ["hi"]},
    }

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return tables[path]

    _fake_datasets(monkeypatch, load_dataset)
    assert cal.load_calibration_text("wikitext2") == "\n\n = Title = \n\n\n Some text . \n"
    assert cal.load_calibration_text("ptb") == ["a sentence", "another one"]
    assert cal.load_calibration_text("c4") == ["doc one", "doc two"]
    assert cal.load_calibration_text("alpaca") == ["### Instruction: hi"]
    assert calls == [
        ("wikitext", "wikitext-2-raw-v1", {"split": "train"}),
        ("ptb_text_only", "penn_treebank", {"split": "train"}),
        ("allenai/c4", None, {"split": "train", "data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}}),
        ("tatsu-lab/alpaca", None, {"split": "train"}),
    ]


def test_hub_text_is_capped_at_a_document_boundary(monkeypatch):
    monkeypatch.setattr(cal, "HUB_MAX_CHARS", 25)
    _fake_datasets(monkeypatch, lambda *a, **k: {"text": ["x" * 10] * 10})
    assert cal.load_calibration_text("c4") == ["x" * 10] * 3

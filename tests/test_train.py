import json
import math

import pytest
import torch

from executor.model import MoEConfig, generate
from executor.tokenizer import ByteTokenizer
from executor.corpus import eval_windows, stdlib_corpus
from executor.train import DEFAULT_MODEL, evaluate, load_trained, train

TINY = MoEConfig(vocab=257, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, experts=4, top_k=2, d_ff=96, max_seq=64)


@pytest.fixture(scope="module")
def corpus():
    return stdlib_corpus(max_bytes=400_000)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("tiny-moe")
    log = train(out, steps=150, config=TINY, batch_size=16, seq_len=64, lr=3e-3, warmup=20, eval_every=50,
                eval_windows_n=8, final_eval_windows=64, corpus=corpus, quiet=True)
    return out, log


def test_corpus_split_is_fixed_and_disjoint(corpus):
    d = corpus.description
    assert d["heldout_files"] > 0 and d["train_files"] > 0
    assert len(corpus.heldout) == d["heldout_bytes"] + d["heldout_files"]  # one end-of-text per file
    again = stdlib_corpus(max_bytes=400_000)
    assert again.description["sha256"] == d["sha256"]


def test_training_beats_the_unigram_baseline_and_writes_files(trained):
    out, log = trained
    for name in ("model.safetensors", "config.json", "tokenizer.json", "train_log.json"):
        assert (out / name).is_file()
    assert not list(out.glob(".*.tmp"))
    assert log["heldout"]["loss_nats"] < log["baselines"]["unigram"]["loss_nats"]
    assert log["evals"][-1]["heldout_loss"] < log["evals"][0]["heldout_loss"]
    assert json.loads((out / "train_log.json").read_text())["heldout"] == log["heldout"]
    assert math.isclose(log["heldout"]["perplexity"], math.exp(log["heldout"]["loss_nats"]), rel_tol=1e-3)
    routing = log["routing_heldout"]
    assert len(routing["fraction"]) == TINY.n_layers and len(routing["fraction"][0]) == TINY.experts
    assert json.loads((out / "config.json").read_text())["model_type"] == "moelab"


def test_loading_reproduces_the_logged_heldout_loss(trained, corpus):
    out, log = trained
    model, tok, cfg = load_trained(out)
    assert cfg == TINY and isinstance(tok, ByteTokenizer)
    windows = eval_windows(corpus.heldout, 64, 64)
    assert abs(evaluate(model, windows) - log["heldout"]["loss_nats"]) < 1e-4
    again, _, _ = load_trained(out)
    x = windows[:2, :-1]
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_time_budget_picks_the_step_count(tmp_path, corpus):
    log = train(tmp_path, minutes=0.1, config=TINY, batch_size=4, seq_len=32, warmup=5, eval_windows_n=4,
                final_eval_windows=8, corpus=corpus, quiet=True)
    assert log["training"]["steps"] >= 6 and log["training"]["minutes_budget"] == 0.1
    assert (tmp_path / "model.safetensors").is_file()


def test_committed_default_model():
    model, tok, cfg = load_trained()
    log = json.loads((DEFAULT_MODEL / "train_log.json").read_text())
    assert (DEFAULT_MODEL / "model.safetensors").stat().st_size <= 10 * 10**6
    assert log["heldout"]["loss_nats"] < log["baselines"]["unigram"]["loss_nats"]
    out = generate(model, torch.tensor(tok.encode("import os\n")), 8)
    assert out.shape == (18,)
    assert isinstance(tok.decode(out.tolist()), str)

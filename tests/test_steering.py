"""Conditional control (METHOD.md §4): attributes, r_c, the steering cache, adapters.

Checked against independent computations: NumPy for ``r_c`` and the conditioned FFN,
the unpatched mlx-lm layers for ``e_c``, the unsteered/unbraced models for ``s = 0``
and ``g = 0``; and a short training run on the embedded stories260K + SST-2 that
must move a likelihood-ratio sentiment score in the direction of the strength.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm import load

from mlx_braces import adapters, apply_braces, braced_layers
from mlx_braces.steering import (
    AttributeDataset,
    SteeringError,
    add_attributes,
    attribute_names,
    install_attributes,
    read_attributes,
    steer,
    steering,
    tokenize_words,
)
from mlx_braces.trainer import default_loss, iterate_batches

sys.path.insert(0, os.path.dirname(__file__))
import tiny_models  # noqa: E402
from tiny_models import quantized  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STORIES = ROOT / "mlx_braces" / "assets" / "stories260K"
SST2 = ROOT / "mlx_braces" / "assets" / "sst2"
WORDS = {"positive": ["happy", "good", "love"], "negative": ["sad", "bad", "angry"]}


@pytest.fixture(scope="module")
def stories():
    return load(str(STORIES))


def example(name: str):
    """``examples/NAME.py`` as a module (examples/ is a plain folder, not a package)."""
    spec = importlib.util.spec_from_file_location(
        name, ROOT / "examples" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fresh(stories):
    """A new copy of stories260K (same weights) and its tokenizer."""
    model, tok = stories
    copy, _ = load(str(STORIES))
    return copy, tok


def randomize_branch(model, seed=0, scale=0.5, gate=-1.0):
    """Non-zero MLP output layers and open gates, so steering changes the logits."""
    key = mx.random.key(seed)
    for i, (_, m) in enumerate(braced_layers(model)):
        k = mx.random.split(mx.random.split(key, len(model.layers))[i])
        m.cond.out.weight = scale * mx.random.normal(m.cond.out.weight.shape, key=k[0])
        m.cond.out.bias = scale * mx.random.normal(m.cond.out.bias.shape, key=k[1])
        m.gate = mx.array([gate])


def steered_model(stories, seed=0):
    model, tok = fresh(stories)
    apply_braces(model, rank=8, seed=seed)
    add_attributes(model, tok, WORDS, hidden_dims=8, seed=seed)
    randomize_branch(model, seed)
    model.eval()
    return model, tok


PROMPT = mx.array([[1, 338, 286, 393, 269, 298, 347, 418, 426]])


# ---------------------------------------------------------------------------
# s = 0, g = 0, numpy r_c, cache


def test_zero_strength_equals_unsteered_adapter(stories):
    model, _ = steered_model(stories)
    plain = model(PROMPT)
    steer(model, {"positive": 0.0, "negative": 0.0})
    assert mx.array_equal(model(PROMPT), plain).item()
    steer(model, {"positive": 1.0})
    assert not mx.allclose(model(PROMPT), plain, atol=1e-3).item()
    steer(model, None)
    assert mx.array_equal(model(PROMPT), plain).item()


def test_zero_gate_equals_base_model(stories):
    model, _ = steered_model(stories)
    base, _ = fresh(stories)
    for _, m in braced_layers(model):
        m.gate = mx.array([-mx.inf])
    steer(model, {"positive": 3.0, "negative": -2.0})
    assert mx.array_equal(model(PROMPT), base(PROMPT)).item()


def _np(a):
    return np.array(a.astype(mx.float32), dtype=np.float64)


def _silu(z):
    return z / (1 + np.exp(-z))


def test_r_c_and_conditioned_ffn_match_numpy(stories):
    model, _ = steered_model(stories)
    steer(model, {"positive": 1.5, "negative": -0.5})
    # Contrast (two exclusive attributes): s_c - sum of the others' / (n - 1).
    s = np.array([1.5 - (-0.5), -0.5 - 1.5])
    x = mx.random.normal((2, 3, 64), key=mx.random.key(1))
    for _, m in braced_layers(model):
        c = m.cond
        e, R = _np(c.e), _np(m.R)
        h = _silu(e @ _np(c.up.weight).T + _np(c.up.bias)) @ _np(c.out.weight).T
        h = h + _np(c.out.bias)
        W_V = _np(m.down.weight)  # (d, d_ff)
        A = R @ W_V
        r_c = (h @ R.T) @ A / np.sqrt(m.rank)  # (n_attr, d_ff)
        np.testing.assert_allclose(_np(c.relevance(m)), r_c, rtol=1e-4, atol=1e-5)

        xn = _np(x)
        w = _silu(xn @ _np(m.ffn.gate_proj.weight).T) * (
            xn @ _np(m.ffn.up_proj.weight).T
        )
        r = (xn @ R.T) @ A / np.sqrt(m.rank)
        g = 1 / (1 + np.exp(-_np(m.gate)[0]))
        want = (w + g * (r + s @ r_c)) @ W_V.T
        np.testing.assert_allclose(_np(m(x)), want, rtol=1e-4, atol=1e-5)


def test_cached_steering_gives_identical_logits(stories):
    model, _ = steered_model(stories)
    steer(model, {"positive": 2.0, "negative": 1.0})
    first = model(PROMPT)  # computes and caches S r_c
    m0 = braced_layers(model)[0][1]
    cached = m0._memo.value("steering")  # the offset (S h_c) Rᵀ
    assert cached is not None
    again = model(PROMPT)
    assert m0._memo.value("steering") is cached  # served from the cache
    assert mx.array_equal(first, again).item()

    # Equal but new arrays (as after load_weights) miss every cache: recomputed
    # from scratch, the logits are the same bit for bit.
    model.update(tree_map(lambda p: p * 1.0, model.trainable_parameters()))
    steer(model, {"positive": 2.0, "negative": 1.0})
    uncached = model(PROMPT)
    assert m0._memo.value("steering") is not cached
    assert mx.array_equal(uncached, first).item()
    # The training path (nothing cached) computes the same function.
    model.train()
    assert mx.allclose(model(PROMPT), first, atol=1e-4).item()
    model.eval()

    # New strengths invalidate the cache.
    steer(model, {"positive": -2.0})
    assert not mx.allclose(model(PROMPT), first, atol=1e-3).item()


def test_per_row_strengths_match_single_rows(stories):
    model, _ = steered_model(stories)
    rows = [{"positive": 2.0}, {"negative": 1.5, "positive": -1.0}]
    steer(model, rows)
    both = model(mx.concatenate([PROMPT, PROMPT]))
    with pytest.raises(ValueError, match="2 rows of strengths but the batch has 1"):
        model(PROMPT)
    for i, row in enumerate(rows):
        steer(model, row)
        assert mx.allclose(both[i], model(PROMPT)[0], atol=1e-5).item()


def test_steering_context_restores(stories):
    model, _ = steered_model(stories)
    steer(model, {"positive": 1.0})
    before = model(PROMPT)
    with steering(model, {"negative": 4.0}):
        assert not mx.allclose(model(PROMPT), before, atol=1e-3).item()
    assert mx.array_equal(model(PROMPT), before).item()


def test_quantized_r_c_matches_dequantized_numpy():
    model = quantized("llama")
    apply_braces(model, rank=4, seed=0)
    d = braced_layers(model)[0][1].dims
    emb = [mx.random.normal((2, d), key=mx.random.key(i)) for i in range(2)]
    install_attributes(model, {"a": ["x"], "b": ["y"]}, emb, hidden_dims=4, seed=0)
    assert attribute_names(model) == ["a", "b"]
    randomize_branch(model)
    for _, m in braced_layers(model):
        down = m.down
        W_V = _np(
            mx.dequantize(
                down.weight, down.scales, down.biases, down.group_size, down.bits
            )
        )
        c = m.cond
        h = _silu(_np(c.e) @ _np(c.up.weight).T + _np(c.up.bias)) @ _np(c.out.weight).T
        h = h + _np(c.out.bias)
        R = _np(m.R)
        want = (h @ R.T) @ (R @ W_V) / np.sqrt(m.rank)
        np.testing.assert_allclose(_np(c.relevance(m)), want, rtol=2e-2, atol=2e-3)


# ---------------------------------------------------------------------------
# e_c from the frozen base model


def test_e_c_is_mean_ffn_input_of_word_tokens(stories):
    model, tok = steered_model(stories)
    base, _ = fresh(stories)
    ids = tokenize_words(tok, WORDS)
    assert ids["positive"][0] == [393]  # " happy" as mid-sentence, no space token
    for c, name in enumerate(WORDS):
        xs = [[] for _ in base.layers]
        for word in ids[name]:  # run the unpatched layers by hand, one word at a time
            h = base.model.embed_tokens(mx.array([[tok.bos_token_id, *word]]))
            mask = "causal"
            for i, layer in enumerate(base.layers):
                h = h + layer.self_attn(layer.input_layernorm(h), mask)
                x = layer.post_attention_layernorm(h)
                xs[i].append(x[0, 1:])  # the word's tokens, not BOS
                h = h + layer.mlp(x)
        for i, (_, m) in enumerate(braced_layers(model)):
            want = mx.concatenate(xs[i]).mean(axis=0)
            assert mx.allclose(m.cond.e[c], want, atol=1e-5).item()


# ---------------------------------------------------------------------------
# Adapters: config, round trip, errors


def test_adapter_round_trip_keeps_attributes(stories, tmp_path):
    model, _ = steered_model(stories)
    steer(model, {"negative": 2.5})
    want = model(PROMPT)
    adapters.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["attributes"] == WORDS
    assert config["attribute_parameters"] == {
        "hidden_dims": 8,
        "contrast": True,
        "steer_only": False,
    }
    saved = mx.load(str(tmp_path / "adapters.safetensors"))
    assert "model.layers.0.mlp.cond.e" in saved
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert "model.layers.0.mlp.cond.e" not in trainable  # frozen buffer
    assert "model.layers.0.mlp.cond.out.weight" in trainable

    loaded, _ = fresh(stories)
    adapters.load_adapter(loaded, tmp_path)
    assert attribute_names(loaded) == ["positive", "negative"]
    steer(loaded, {"negative": 2.5})
    assert mx.array_equal(loaded(PROMPT), want).item()


def test_adapter_attribute_errors(stories, tmp_path):
    model, _ = steered_model(stories)
    adapters.save_adapter(model, tmp_path)
    cfg_file = tmp_path / "adapter_config.json"
    config = json.loads(cfg_file.read_text())

    def load_with(cfg):
        cfg_file.write_text(json.dumps(cfg))
        return adapters.load_adapter(fresh(stories)[0], tmp_path)

    with pytest.raises(
        adapters.AdapterError,
        match="lists attributes positive, negative, neutral|cond.e has shape",
    ):
        load_with({**config, "attributes": {**WORDS, "neutral": ["ok"]}})
    no_attr = {k: v for k, v in config.items() if not k.startswith("attribute")}
    with pytest.raises(
        adapters.AdapterError, match="attribute tensors .* lists no 'attributes'"
    ):
        load_with(no_attr)
    with pytest.raises(adapters.AdapterError, match="attribute 'positive' must list"):
        load_with({**config, "attributes": {"positive": [], "negative": ["bad"]}})

    plain, _ = fresh(stories)
    apply_braces(plain, rank=8)
    adapters.save_adapter(plain, tmp_path / "plain")
    cfg = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    (tmp_path / "plain" / "adapter_config.json").write_text(
        json.dumps(
            {**cfg, "attributes": WORDS, "attribute_parameters": {"hidden_dims": 8}}
        )
    )
    with pytest.raises(
        adapters.AdapterError, match="weights have no attribute tensors"
    ):
        adapters.load_adapter(fresh(stories)[0], tmp_path / "plain")


def test_steering_errors(stories):
    model, tok = steered_model(stories)
    with pytest.raises(
        SteeringError, match="unknown attribute 'happy'.*positive, negative"
    ):
        steer(model, {"happy": 1.0})
    with pytest.raises(SteeringError, match="finite number"):
        steer(model, {"positive": float("nan")})
    plain, _ = fresh(stories)
    apply_braces(plain, rank=4)
    assert attribute_names(plain) == []
    with pytest.raises(SteeringError, match="trained without attributes"):
        steer(plain, {"positive": 1.0})
    steer(plain, None)  # clearing is always fine


def test_word_that_tokenizes_to_nothing():
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(WordLevel({"good": 0, "bad": 1}, unk_token=None))
    raw.normalizer = normalizers.Sequence(
        [normalizers.NFD(), normalizers.StripAccents()]
    )
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw)
    assert tokenize_words(tok, {"p": ["good"]}) == {"p": [[0]]}
    with pytest.raises(
        SteeringError, match="attribute 'n': word '\u0301' tokenizes to nothing"
    ):
        tokenize_words(tok, {"p": ["good"], "n": ["bad", "\u0301"]})


def test_read_attributes(tmp_path):
    shipped = read_attributes("sentiment")
    assert set(shipped) == {"positive", "negative"} and "happy" in shipped["positive"]
    (tmp_path / "a.json").write_text(json.dumps({"formal": ["sir", "regards"]}))
    assert read_attributes(tmp_path / "a.json") == {"formal": ["sir", "regards"]}
    (tmp_path / "b.yaml").write_text("positive: [good]\nnegative: 3\n")
    with pytest.raises(SteeringError, match="b.yaml: attribute 'negative' must list"):
        read_attributes(tmp_path / "b.yaml")
    with pytest.raises(SteeringError, match="not found .*sentiment"):
        read_attributes(tmp_path / "missing.yaml")


# ---------------------------------------------------------------------------
# Training with attribute labels


def sst2(split, n=None):
    rows = [json.loads(line) for line in open(SST2 / f"{split}.jsonl")]
    return rows[:n]


def test_dataset_batches_and_loss(stories):
    from mlx_lm.tuner.datasets import CacheDataset, TextDataset

    model, tok = steered_model(stories)
    rows = sst2("valid", 8) + [{"text": "no label here"}]
    data = AttributeDataset(
        CacheDataset(TextDataset(rows, tok)), ["positive", "negative"]
    )
    seen = 0
    for batch, lengths, labels in iterate_batches(data, 3, 64, seed=0):
        for b in range(3):
            n = int(lengths[b, 1])
            j = next(
                i for i in range(len(rows)) if data[i][0][:n] == batch[b, :n].tolist()
            )
            label = rows[j].get("attribute")
            assert labels[b].tolist() == [
                float(label == "positive"),
                float(label == "negative"),
            ]
            seen += 1
        # The loss is the LM loss with each row steered by its label (s = +1).
        got, _ = default_loss(model, batch, lengths, labels)
        steer(model, [dict(zip(["positive", "negative"], r)) for r in labels.tolist()])
        want, _ = default_loss(model, batch, lengths)
        steer(model, None)
        assert abs(got.item() - want.item()) < 1e-5
        assert braced_layers(model)[0][1].cond.strengths is None  # restored after
    assert seen == 9

    bad = TextDataset([rows[0], {"text": "x", "attribute": "neutral"}], tok)
    with pytest.raises(SteeringError, match="example 2: attribute 'neutral' is not"):
        AttributeDataset(CacheDataset(bad), ["positive", "negative"])


def test_contrast_makes_exclusive_attributes_opposite(stories):
    model, _ = steered_model(stories)
    steer(model, {"negative": 1.5})
    negative = model(PROMPT)
    steer(model, {"positive": -1.5})
    assert mx.allclose(model(PROMPT), negative, atol=1e-6).item()

    # Without contrast (one-hot labels, METHOD.md literally) they are independent.
    plain, _ = fresh(stories)
    apply_braces(plain, rank=8, seed=0)
    install_attributes(
        plain, WORDS, [m.cond.e for _, m in braced_layers(model)], 8, contrast=False
    )
    plain.update(model.trainable_parameters())
    steer(plain, {"negative": 1.5})
    assert not mx.allclose(plain(PROMPT), negative, atol=1e-3).item()
    steer(plain, {"positive": -1.5, "negative": 1.5})  # the contrast, spelled out
    assert mx.allclose(plain(PROMPT), negative, atol=1e-6).item()


@pytest.mark.parametrize("steer_only", [False, True], ids=["full", "steer-only"])
def test_trained_attribute_moves_sentiment_score(stories, steer_only):
    """Steering must move log p(positive) - log p(negative) of held-out SST-2 its way.

    The attribute is trained on short SST-2 train sentences for 100 steps. ``R`` and
    the gate stay fixed (g = 0.5) so that only the conditional branch learns, which
    keeps the run short; the score uses SST-2 dev sentences the model never saw
    (steer-only: without the r(x) that trained beside the branch).
    """
    from mlx_lm.tuner.datasets import CacheDataset, TextDataset

    model, tok = fresh(stories)
    apply_braces(model, rank=8, seed=0, gate_init=0.0)
    add_attributes(model, tok, "sentiment", seed=0, steer_only=steer_only)
    for _, m in braced_layers(model):
        m.freeze(keys=["R", "gate"], recurse=False)
    train = [r for r in sst2("train") if len(r["text"].split()) <= 10]
    data = AttributeDataset(
        CacheDataset(TextDataset(train, tok)), attribute_names(model)
    )
    opt = optim.Adam(learning_rate=1e-2)
    step = nn.value_and_grad(model, default_loss)
    model.train()
    for _, batch in zip(range(100), iterate_batches(data, 8, 64, loop=True, seed=0)):
        _, grads = step(model, *batch)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
    model.eval()

    # The example's score: per-token log p(positive rows) - log p(negative rows).
    sentiment_score = example("steer_sentiment").sentiment_score
    held = [r for r in sst2("test") if len(r["text"].split()) <= 10]
    pos = [r for r in held if r["attribute"] == "positive"][:100]
    neg = [r for r in held if r["attribute"] == "negative"][:100]
    score = {}
    for s in (-1.0, 0.0, 1.0):
        steer(model, {"positive": s})
        score[s] = sentiment_score(model, tok, pos + neg)
    assert score[1.0] > score[0.0] + 0.002 and score[0.0] > score[-1.0] + 0.002, score


# ---------------------------------------------------------------------------
# Import graph


def _our_imports(file: Path, top_level: bool) -> set[str]:
    """The mlx_braces modules ``file`` imports (top-level statements, or anywhere)."""
    import ast

    tree = ast.parse(file.read_text())
    nodes = tree.body if top_level else list(ast.walk(tree))
    level = 2 if file.parent.name == "conversion" else 1  # relative to mlx_braces/
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level == level:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("mlx_braces."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("mlx_braces.")]
            out.update(n.split(".")[1] for n in names)
    return out


def test_import_graph_has_no_cycle_and_steering_needs_only_braces():
    pkg = ROOT / "mlx_braces"
    graph = {f.stem: _our_imports(f, True) for f in pkg.glob("*.py")}
    graph.pop("__init__")
    graph["conversion"] = set().union(
        *(_our_imports(f, True) for f in (pkg / "conversion").glob("*.py"))
    )
    assert graph["steering"] == {"braces"}
    # Not even inside a function: no trainer, train or adapters.
    later = _our_imports(pkg / "steering.py", False)
    assert not later & {"trainer", "train", "adapters"}, later

    done, path = set(), []

    def visit(module: str) -> None:
        assert module not in path, "import cycle: " + " -> ".join(path + [module])
        if module in done or module not in graph:
            return
        path.append(module)
        for dep in sorted(graph[module]):
            visit(dep)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_importing_steering_loads_no_trainer():
    """Imported alone (the package's __init__ bypassed), steering loads braces only."""
    import subprocess

    code = (
        "import sys, types\n"
        "pkg = types.ModuleType('mlx_braces')\n"
        f"pkg.__path__ = [{str(ROOT / 'mlx_braces')!r}]\n"
        "sys.modules['mlx_braces'] = pkg\n"
        "import mlx_braces.steering\n"
        "print(sorted(m for m in sys.modules if m.startswith('mlx_braces.')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "['mlx_braces.braces', 'mlx_braces.steering']"


# ---------------------------------------------------------------------------
# Steer-only attributes: r(x) trains beside the attributes and is dropped outside
# training (METHOD.md §4, §7 "Steering")


def steer_only_model(stories, seed=0):
    model, tok = fresh(stories)
    apply_braces(model, rank=8, seed=seed)
    add_attributes(model, tok, WORDS, hidden_dims=8, seed=seed, steer_only=True)
    randomize_branch(model, seed)
    model.eval()
    return model, tok


def test_steer_only_unsteered_is_the_base_model_exactly(stories):
    model, _ = steer_only_model(stories)  # open gates, non-zero R and MLP
    base, _ = fresh(stories)
    assert mx.array_equal(model(PROMPT), base(PROMPT)).item()
    steer(model, {"positive": 0.0})
    assert mx.array_equal(model(PROMPT), base(PROMPT)).item()
    steer(model, {"positive": 2.0})
    assert not mx.allclose(model(PROMPT), base(PROMPT), atol=1e-3).item()
    steer(model, None)
    model.train()  # training keeps r(x): the full brace's function, not the base
    assert not mx.allclose(model(PROMPT), base(PROMPT), atol=1e-3).item()


def test_steer_only_trains_as_the_full_brace(stories):
    """A steer-only adapter is trained exactly as a full one (r(x) takes the data's
    domain); only the layers' function outside training differs."""
    only, _ = steer_only_model(stories)
    full, _ = steered_model(stories)  # same seeds, same randomised branch
    steer(only, {"positive": 1.0})
    steer(full, {"positive": 1.0})
    only.train()
    full.train()
    assert mx.array_equal(only(PROMPT), full(PROMPT)).item()
    only.eval()
    full.eval()
    assert not mx.allclose(only(PROMPT), full(PROMPT), atol=1e-3).item()


def test_steer_only_ffn_matches_numpy_in_train_and_inference(stories):
    model, _ = steer_only_model(stories)
    steer(model, {"positive": 1.5, "negative": -0.5})
    s = np.array([1.5 - (-0.5), -0.5 - 1.5])  # contrast, as above
    x = mx.random.normal((2, 3, 64), key=mx.random.key(1))
    for _, m in braced_layers(model):
        c = m.cond
        R, W_V = _np(m.R), _np(m.down.weight)
        h = _silu(_np(c.e) @ _np(c.up.weight).T + _np(c.up.bias))
        h = h @ _np(c.out.weight).T + _np(c.out.bias)
        r_c = (h @ R.T) @ (R @ W_V) / np.sqrt(m.rank)
        xn = _np(x)
        w = _silu(xn @ _np(m.ffn.gate_proj.weight).T) * (
            xn @ _np(m.ffn.up_proj.weight).T
        )
        g = 1 / (1 + np.exp(-_np(m.gate)[0]))
        r_x = ((xn @ R.T) @ (R @ W_V)) / np.sqrt(m.rank)
        m.eval()
        want = (w + g * (s @ r_c)) @ W_V.T  # no r(x)
        np.testing.assert_allclose(_np(m(x)), want, rtol=1e-4, atol=1e-5)
        m.train()
        want = (w + g * (r_x + s @ r_c)) @ W_V.T  # r(x) in training
        np.testing.assert_allclose(_np(m(x)), want, rtol=1e-4, atol=1e-5)


def test_steer_only_round_trip_and_errors(stories, tmp_path):
    model, _ = steer_only_model(stories)
    steer(model, {"negative": 1.5})
    want = model(PROMPT)
    adapters.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["attribute_parameters"]["steer_only"] is True
    loaded, _ = fresh(stories)
    adapters.load_adapter(loaded, tmp_path)
    assert all(m.steer_only for _, m in braced_layers(loaded))
    steer(loaded, {"negative": 1.5})
    assert mx.array_equal(loaded(PROMPT), want).item()
    # an adapter saved before the field existed loads as a full brace
    del config["attribute_parameters"]["steer_only"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    old, _ = fresh(stories)
    adapters.load_adapter(old, tmp_path)
    assert not any(m.steer_only for _, m in braced_layers(old))
    config["attribute_parameters"]["steer_only"] = "yes"
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(adapters.AdapterError, match="steer_only must be true or false"):
        adapters.load_adapter(fresh(stories)[0], tmp_path)
    moe = tiny_models.build("qwen3_moe")
    apply_braces(moe, rank=4)
    with pytest.raises(SteeringError, match="steer-only attributes brace dense FFNs"):
        install_attributes(moe, WORDS, steer_only=True)

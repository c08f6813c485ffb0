"""Relevance inspection: what a brace changes, checked against NumPy.

* Value vectors, their norms and the tokens they promote equal a direct NumPy
  computation (W_V column -> final norm -> unembedding -> argsort), full precision
  and 4-bit.
* ``unembed`` reads out exactly as each mlx-lm architecture's own forward does.
* The captured ``w`` and ``g·r``, the per-token relative change and the ranking
  equal NumPy recomputed from the FFN input and the weights.
* The CLI prints a table and JSON, writes a PNG of the expected size, and turns bad
  input into ``Error: ...``.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm import load as mlx_load

sys.path.insert(0, os.path.dirname(__file__))

from tiny_models import CONFIGS, build, dense_weight, quantized  # noqa: E402

from mlx_braces import (  # noqa: E402
    apply_braces,
    braced_layers,
    load_adapter,
    save_adapter,
)
from mlx_braces.lens import (  # noqa: E402
    FINAL_NORMS,
    capture,
    inspect_braces,
    main,
    promoted_tokens,
    unembed,
    value_norms,
    value_vectors,
)
from mlx_braces.models import EMBEDDED_MODEL as STORIES  # noqa: E402

PROMPT = "Once upon a time, there was a little girl named Lily."


def np32(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def dequantized(layer: nn.Module) -> np.ndarray:
    """The full weight matrix of a (possibly quantized) linear or embedding."""
    return np32(dense_weight(layer))


def numpy_logits(model, braced, indices):
    """``E · rmsnorm(v_j)`` in NumPy: the logit lens of value vectors (|J|, vocab)."""
    v = dequantized(braced.down)[:, indices].T  # (|J|, d)
    norm = model.model.norm
    v = v / np.sqrt((v**2).mean(-1, keepdims=True) + norm.eps) * np32(norm.weight)
    E = dequantized(model.lm_head if "lm_head" in model else model.model.embed_tokens)
    return v @ E.T


# ---------------------------------------------------------------------------
# Value vectors and their promoted tokens


@pytest.mark.parametrize("arch", ["llama", "phi3"])  # tied embedding, own lm_head
def test_promoted_tokens_match_numpy(arch):
    model = apply_braces(build(arch), rank=4, seed=0)
    braced = model.layers[1].mlp
    J = [0, 7, 50, 95]
    ids, scores = promoted_tokens(model, 1, J, k=6)
    logits = numpy_logits(model, braced, J)
    want = np.argsort(-logits, axis=-1)[:, :6]
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(
        scores, np.take_along_axis(logits, want, -1), rtol=1e-4, atol=1e-4
    )


def test_promoted_tokens_layernorm_drops_the_shared_bias():
    """GPT-2: LayerNorm and its bias; the bias (common to every vector) is left out."""
    model = apply_braces(build("gpt2"), rank=4, seed=0)
    braced = model.layers[0].mlp
    J = [3, 100, 255]
    ids, scores = promoted_tokens(model, 0, J, k=5)
    E = np32(model.model.wte.weight)
    v = dequantized(braced.down)[:, J].T
    v = (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-5)
    logits = (v * np32(model.model.ln_f.weight)) @ E.T
    want = np.argsort(-logits, axis=-1)[:, :5]
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(
        scores, np.take_along_axis(logits, want, -1), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("mode", ["affine", "mxfp4"])
def test_quantized_value_vectors_and_promoted_tokens_match_dequantized_numpy(mode):
    model = apply_braces(quantized("llama", bits=4, mode=mode), rank=4, seed=0)
    braced = model.layers[0].mlp
    assert isinstance(braced.down, nn.QuantizedLinear)
    W_V = dequantized(braced.down)  # (d, d_ff)
    J = [1, 2, 64]
    np.testing.assert_allclose(
        np32(value_vectors(braced.down, J)), W_V[:, J].T, rtol=1e-3, atol=1e-3
    )
    np.testing.assert_allclose(
        np32(value_norms(braced.down, chunk=24)),
        np.linalg.norm(W_V, axis=0),
        rtol=1e-3,
    )
    ids, scores = promoted_tokens(model, braced, J, k=3)
    logits = numpy_logits(model, braced, J)
    # 4-bit scores may tie: compare the scores, and that they are the top ones.
    np.testing.assert_allclose(
        scores, np.take_along_axis(logits, ids, -1), rtol=1e-2, atol=1e-2
    )
    np.testing.assert_allclose(
        scores, -np.sort(-logits, -1)[:, :3], rtol=1e-2, atol=1e-2
    )


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_unembed_reads_out_like_the_model(arch):
    """``unembed`` of the final norm's input gives the model's own logits."""
    model = build(arch)
    inner = model.model
    name = next(n for n in FINAL_NORMS if n in inner)

    class Recorder(nn.Module):
        def __init__(self, norm):
            super().__init__()
            self.norm = norm
            self.seen = []

        def __call__(self, x):
            self.seen.append(x)
            return self.norm(x)

    setattr(inner, name, Recorder(inner[name]))
    tokens = mx.array([[1, 5, 9, 42, 7]])
    logits = model(tokens)
    h = inner[name].seen[0]
    np.testing.assert_allclose(
        np32(unembed(model, h)), np32(logits), rtol=1e-4, atol=1e-4
    )


# ---------------------------------------------------------------------------
# Capture, relative change and ranking vs NumPy


class RecordInput(nn.Module):
    """Wraps a braced FFN to keep its input ``x`` (the FFN input after the norm)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.x = None

    def __call__(self, x):
        self.x = x
        return self.inner(x)


def silu(a):
    return a / (1 + np.exp(-a))


@pytest.fixture(scope="module")
def stories():
    model, tokenizer = mlx_load(str(STORIES))
    apply_braces(model, rank=8, gate_init=0.0, seed=1)  # g = 0.5: visible changes
    return model, tokenizer


def numpy_brace(braced, x):
    """``w``, ``g·r`` and the relative output change of a SwiGLU brace, in NumPy."""
    ffn = braced.ffn
    W_V = np32(braced.down.weight)  # (d, d_ff)
    R = np32(braced.R)  # (rank, d)
    w = silu(x @ np32(ffn.gate_proj.weight).T) * (x @ np32(ffn.up_proj.weight).T)
    r = (x @ R.T) @ (R @ W_V) / math.sqrt(braced.rank)
    delta = float(np32(braced.g)[0]) * r
    rel = np.linalg.norm(delta @ W_V.T, axis=-1) / np.linalg.norm(w @ W_V.T, axis=-1)
    return w, delta, rel


def test_capture_relative_change_and_ranking_match_numpy(stories):
    model, tokenizer = stories
    wrapped = []
    for layer in model.layers:
        layer.mlp = RecordInput(layer.mlp)
        wrapped.append(layer.mlp)
    try:
        ins = inspect_braces(model, tokenizer, PROMPT, top_vectors=4, top_tokens=3)
        tokens = tokenizer.encode(PROMPT)
        pairs = capture(model, tokens)
    finally:
        for layer, rec in zip(model.layers, wrapped):
            layer.mlp = rec.inner
    np.testing.assert_array_equal(ins.tokens, tokens)
    assert ins.layers == [0, 1, 2, 3, 4]
    assert ins.paths == [f"model.layers.{i}.mlp.inner" for i in range(5)]
    T = len(tokens)
    assert ins.relative_change.shape == (5, T)
    assert ins.indices.shape == (5, 4) and ins.promoted.shape == (5, 4, 3)
    for i, rec in enumerate(wrapped):
        braced = rec.inner
        w, delta, rel = numpy_brace(braced, np32(rec.x)[0])
        np.testing.assert_allclose(pairs[i][0], w, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(pairs[i][1], delta, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ins.relative_change[i], rel, rtol=1e-4)
        np.testing.assert_allclose(ins.gates[i], 0.5)
        change = np.abs(delta).mean(0) * np.linalg.norm(
            np32(braced.down.weight), axis=0
        )
        top = np.argsort(-change)[:4]
        np.testing.assert_array_equal(ins.indices[i], top)
        np.testing.assert_allclose(ins.change[i], change[top], rtol=1e-4)
        np.testing.assert_allclose(
            ins.relative[i],
            np.abs(delta[:, top]).sum(0) / np.abs(w[:, top]).sum(0),
            rtol=1e-4,
        )
        np.testing.assert_allclose(ins.delta[i], delta[:, top].mean(0), atol=1e-6)
        ids, _ = promoted_tokens(model, braced, top, 3)
        np.testing.assert_array_equal(ins.promoted[i], ids)
        # A token's text is how it reads after BOS inside a text.
        bos = tokenizer.decode([1])
        assert (
            ins.promoted_text[i][0][0] == tokenizer.decode([1, ids[0, 0]])[len(bos) :]
        )
    assert "".join(ins.token_text) == tokenizer.decode(tokens)


def test_per_token_ranking(stories):
    model, tokenizer = stories
    ins = inspect_braces(
        model, tokenizer, "Once upon a", top_vectors=3, top_tokens=2, per_token=True
    )
    pairs = capture(model, ins.tokens)
    T = len(ins.tokens)
    assert ins.indices.shape == (5, T, 3) and ins.promoted.shape == (5, T, 3, 2)
    assert len(ins.promoted_text[2][T - 1][1]) == 2
    for i, (w, delta) in enumerate(pairs):
        norms = np.linalg.norm(np32(model.layers[i].mlp.down.weight), axis=0)
        change = np.abs(delta) * norms
        want = np.argsort(-change, axis=-1)[:, :3]
        np.testing.assert_array_equal(ins.indices[i], want)
        np.testing.assert_allclose(
            ins.weight[i], np.take_along_axis(w, want, -1), atol=1e-6
        )
    assert ins.token_text[:2] == ["<s>", " Once"]
    data = json.loads(json.dumps(ins.to_dict()))
    vec = data["layers"][4]["tokens"][T - 1]["vectors"][2]
    assert vec["index"] == ins.indices[4, T - 1, 2]
    assert [p["id"] for p in vec["promotes"]] == ins.promoted[4, T - 1, 2].tolist()


def test_steering_applies_for_the_call_only():
    """``steering=`` adds the token-independent ``g·s·r_c`` and is undone after."""
    from mlx_braces.steering import add_attributes, steering

    model, tokenizer = mlx_load(str(STORIES))
    apply_braces(model, rank=8, gate_init=0.0, seed=1)
    add_attributes(model, tokenizer, {"happy": ["happy", "smile"]}, contrast=False)
    for i, (_, m) in enumerate(braced_layers(model)):  # as if trained: h_c != 0
        shape = m.cond.out.weight.shape
        m.cond.out.weight = 0.5 * mx.random.normal(shape, key=mx.random.key(i))
    base = inspect_braces(model, tokenizer, PROMPT, top_vectors=2, top_tokens=2)
    steered = inspect_braces(
        model, tokenizer, PROMPT, top_vectors=2, top_tokens=2, steering={"happy": 3.0}
    )
    after = inspect_braces(model, tokenizer, PROMPT, top_vectors=2, top_tokens=2)
    np.testing.assert_array_equal(after.relative_change, base.relative_change)
    assert steered.steering == {"happy": 3.0} and base.steering is None
    plain = capture(model, base.tokens)
    with steering(model, {"happy": 3.0}):
        pairs = capture(model, base.tokens)
    # Layer 0 sees the same input either way: steering adds g·s·r_c, the same
    # for every token (later layers see a residual stream steering has changed).
    shift = pairs[0][1] - plain[0][1]
    np.testing.assert_allclose(shift, np.broadcast_to(shift[0], shift.shape), atol=1e-5)
    assert np.abs(shift).max() > 1e-3
    for i, (w, delta) in enumerate(pairs):
        W_V = np32(model.layers[i].mlp.down.weight)
        want = np.linalg.norm(delta @ W_V.T, axis=-1) / np.linalg.norm(
            w @ W_V.T, axis=-1
        )
        np.testing.assert_allclose(steered.relative_change[i], want, rtol=1e-4)


def test_gate_zero_means_no_change():
    """A closed gate (g = 0) changes nothing, while the same braces opened do."""
    model = apply_braces(build("llama"), rank=4, gate_init=-math.inf, seed=0)
    tokens = mx.array([[1, 2, 3]])
    assert mx.array_equal(model(tokens), build("llama")(tokens))  # the unpatched model

    class Tok:  # token ids in, their decimal text out
        def decode(self, ids):
            return "".join(f"<{i}>" for i in ids)

    ins = inspect_braces(model, Tok(), [1, 2, 3], top_vectors=2, top_tokens=2)
    assert np.all(ins.gates == 0) and np.all(ins.relative_change == 0)
    assert np.all(ins.change == 0) and ins.token_text == ["<1>", "<2>", "<3>"]
    assert np.abs(ins.weight).max() > 0  # the FFNs did run: only the brace is off
    for _, m in braced_layers(model):  # the same R, gate opened to g = 0.5
        m.gate = mx.zeros((1,))
    opened = inspect_braces(model, Tok(), [1, 2, 3], top_vectors=2, top_tokens=2)
    assert np.all(opened.gates == 0.5) and np.all(opened.relative_change > 0)
    assert np.all(opened.change > 0)


# ---------------------------------------------------------------------------
# CLI


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    model, _ = mlx_load(str(STORIES))
    apply_braces(model, rank=8, gate_init=-1.0, seed=0)
    return save_adapter(
        model, tmp_path_factory.mktemp("inspect") / "adapter", model=str(STORIES)
    )


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_cli_json_and_plot(adapter, tmp_path):
    """``python -m mlx_braces.lens`` writes the JSON and PNG of an inspection."""
    pytest.importorskip("matplotlib")
    png = tmp_path / "brace.png"
    out = subprocess.run(
        [sys.executable, "-m", "mlx_braces.lens", "--adapter-path", str(adapter)]
        + ["--prompt", PROMPT, "--json", "--top-vectors", "2", "--top-tokens", "3"]
        + ["--plot", str(png)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    model, tokenizer = mlx_load(str(STORIES))
    load_adapter(model, adapter)
    ins = inspect_braces(model, tokenizer, PROMPT, top_vectors=2, top_tokens=3)
    assert [t["id"] for t in data["tokens"]] == ins.tokens.tolist()
    assert [entry["layer"] for entry in data["layers"]] == [0, 1, 2, 3, 4]
    for i, entry in enumerate(data["layers"]):
        assert entry["gate"] == pytest.approx(1 / (1 + math.e))
        assert [v["index"] for v in entry["vectors"]] == ins.indices[i].tolist()
        got = [[p["id"] for p in v["promotes"]] for v in entry["vectors"]]
        assert got == ins.promoted[i].tolist()
        np.testing.assert_allclose(entry["relative_change"], ins.relative_change[i])
    assert png_size(png) == (1200, 600)
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[:2] == (600, 1200)


def test_cli_table(adapter, capsys):
    main(["--adapter-path", str(adapter), "--prompt", "Once upon"])
    out = capsys.readouterr().out
    assert "Prompt (3 tokens): '<s>' ' Once' ' upon'" in out
    for i in range(5):
        assert f"layer {i} (model.layers.{i}.mlp)  g = 0.2689" in out
    header = ["j", "change", "rel", "w", "Δw", "promotes"]
    assert sum(line.split() == header for line in out.splitlines()) == 5
    assert len(out.splitlines()) == 4 + 5 * (2 + 1 + 5)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--attribute", "positive"], "--attribute and --strength pair up"),
        (["--top-vectors", "0"], "at least 1"),
        (["--model", "/no/such/model"], "cannot load the model"),
    ],
)
def test_cli_errors(adapter, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        main(["--adapter-path", str(adapter), "--prompt", "Once"] + extra)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and message in err and "Traceback" not in err


def test_cli_missing_adapter(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--adapter-path", str(tmp_path / "none"), "--prompt", "x"])
    assert e.value.code == 1
    assert "adapter_config.json: not found" in capsys.readouterr().err


def test_cli_steering_an_adapter_without_attributes(adapter, capsys):
    with pytest.raises(SystemExit) as e:
        main(
            ["--adapter-path", str(adapter), "--prompt", "x"]
            + ["--attribute", "no-such-attribute", "--strength", "1"]
        )
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and "attributes" in err

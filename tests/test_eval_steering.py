"""scripts/eval_steering.py: its model switches and metrics against independent
computations, and a smoke run on stories260K that writes every field and the plot."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm import load as mlx_lm_load
from scripts_module import load_script

from mlx_braces import add_attributes, apply_braces, save_adapter

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "eval_steering.py"
STORIES = ROOT / "mlx_braces" / "assets" / "stories260K"
WORDS = {"positive": ["happy", "good", "love"], "negative": ["sad", "bad", "angry"]}


es = load_script("eval_steering")


def _braced(seed: int = 0):
    """stories260K with braces and a random (non-zero) attribute branch, gates open."""
    model, tok = mlx_lm_load(str(STORIES))
    apply_braces(model, rank=8, seed=seed)
    add_attributes(model, tok, WORDS, hidden_dims=8, seed=seed)
    key = mx.random.key(seed)
    for i, (_, m) in enumerate(es.braced_layers(model)):
        k = mx.random.split(mx.random.split(key, len(model.layers))[i])
        m.cond.out.weight = 0.5 * mx.random.normal(m.cond.out.weight.shape, key=k[0])
        m.cond.out.bias = 0.5 * mx.random.normal(m.cond.out.bias.shape, key=k[1])
        m.gate = mx.array([-1.0])
    model.eval()
    return model, tok


def _hidden_after(model, tokens: mx.array, layer: int) -> mx.array:
    """The residual stream after block ``layer``, by hand from mlx-lm's pieces."""
    inner = model.model
    h = inner.embed_tokens(tokens)
    mask = nn.MultiHeadAttention.create_additive_causal_mask(tokens.shape[1])
    for block in inner.layers[: layer + 1]:
        h = block(h, mask.astype(h.dtype), None)
    return h


def test_switch_base_is_the_unpatched_model_and_actadd_adds_after_the_block():
    model, tok = _braced()
    plain, _ = mlx_lm_load(str(STORIES))
    x = mx.array([tok.encode("Once upon a time there was")])
    sw = es.Switch(model)
    assert not np.allclose(np.array(model(x)), np.array(plain(x)), atol=1e-4)
    sw.base(True)
    np.testing.assert_allclose(np.array(model(x)), np.array(plain(x)), atol=1e-5)
    # actadd: + c·v after block 2, compared with the hand-built residual stream
    v = mx.random.normal((model.args.hidden_size,), key=mx.random.key(3))
    sw.wrapper(2).vector = v
    sw.actadd(2, 0.7)
    got = np.array(model(x))
    sw.actadd(None)
    inner = plain.model
    h = _hidden_after(plain, x, 2)
    h = mx.concatenate([h[:, :1], h[:, 1:] + 0.7 * v], axis=1)  # not the first
    mask = nn.MultiHeadAttention.create_additive_causal_mask(x.shape[1])
    for block in inner.layers[3:]:
        h = block(h, mask.astype(h.dtype), None)
    want = np.array(inner.embed_tokens.as_linear(inner.norm(h)))
    if "lm_head" in plain:
        want = np.array(plain.lm_head(inner.norm(h)))
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert type(model.layers[2]).__name__ != "_AddToResidual"  # removed again
    sw.base(False)


def test_batched_sampling_equals_one_prompt_at_a_time():
    """Greedy continuations of ragged prompts in one left-padded batch (BatchKVCache)
    equal each prompt's own, steered and with activation addition too."""
    model, tok = _braced()
    sw = es.Switch(model)
    greedy = es.make_sampler(temp=0.0)
    prompts = [tok.encode(t) for t in ("Once upon a time there", "The dog", "She was")]
    assert len({len(p) for p in prompts}) == 3  # ragged: the batch is left-padded
    sw.wrapper(2).vector = mx.random.normal(
        (model.args.hidden_size,), key=mx.random.key(1)
    )
    for layer, coef, strength in ((None, 0.0, None), (None, 0.0, 2.0), (2, 0.5, None)):
        sw.actadd(layer, coef)
        with es.steering(model, None if strength is None else {"positive": strength}):
            batched = es.sample(model, sw, prompts, 2, 8, greedy, set())
            alone = [es._sample_rows(model, sw, [p], 8, greedy, set()) for p in prompts]
        sw.actadd(None)
        assert [g[0] for g in batched] == [a[0] for a in alone]
        assert all(g[0] == g[1] for g in batched)  # greedy: both samples agree
    assert batched != es.sample(model, sw, prompts, 2, 8, greedy, set())  # actadd acted


def test_mean_hidden_matches_numpy():
    model, tok = _braced()
    sw = es.Switch(model)
    sw.base(True)
    texts = ["a happy dog", "the sad cat sat down", "love"]
    got, got_norm = es.mean_hidden(model, sw, 1, tok, texts)
    pre = tok.encode("")
    rows = []
    for t in texts:
        ids = tok.encode(t)
        h = np.array(_hidden_after(model, mx.array([ids]), 1))[0, len(pre) :]
        rows.append(h.astype(np.float64))
    allh = np.concatenate(rows)
    np.testing.assert_allclose(np.array(got), allh.mean(0), atol=1e-4)
    assert math.isclose(got_norm, np.linalg.norm(allh, axis=-1).mean(), rel_tol=1e-4)


def test_perplexities_match_numpy():
    plain, tok = mlx_lm_load(str(STORIES))
    prompt = tok.encode("Once upon a time")
    conts = [tok.encode("there was a dog", add_special_tokens=False), [], [42, 7]]
    got = es.perplexities(plain, prompt, conts)
    assert len(got) == 2  # the empty continuation has none
    for c, ppl in zip([conts[0], conts[2]], got):
        seq = prompt + c
        logits = np.array(plain(mx.array([seq]))[0]).astype(np.float64)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll = [-logp[len(prompt) - 1 + i, t] for i, t in enumerate(c)]
        assert math.isclose(ppl, math.exp(np.mean(nll)), rel_tol=1e-4)


def test_distinct_and_equal_fluency():
    assert es.distinct(["a b a b", "a c"], 1) == 3 / 6
    assert es.distinct(["a b a b"], 2) == 2 / 3
    rows = [
        {"method": "base", "share": 0.4, "ppl": 10.0},
        {"method": "braces", "strength": 1.0, "share": 0.6, "ppl": 12.0},
        {"method": "braces", "strength": 4.0, "share": 0.9, "ppl": 40.0},
        {"method": "actadd", "layer": 2, "strength": 4.0, "share": 0.95, "ppl": 99.0},
    ]
    best = {b["family"]: b for b in es.equal_fluency(rows, 1.5, toward=True)}
    assert best["braces"]["strength"] == 1.0  # 4.0 is over the budget
    assert best["actadd"]["label"] == "none within budget"
    rows.append({"method": "braces", "strength": -1.0, "share": 0.3, "ppl": 11.0})
    low = {b["family"]: b for b in es.equal_fluency(rows, 10.0, toward=False)}
    assert low["braces"]["strength"] == -1.0  # the only one below the base's 0.4
    assert low["actadd"]["label"] == "none within budget"  # it only raises it


def test_smoke_run_writes_every_field_and_the_plot(tmp_path):
    pytest.importorskip("matplotlib")
    model, _ = _braced()
    save_adapter(model, tmp_path / "adapter", model=str(STORIES))
    prompts = tmp_path / "assets" / Path(es.PROMPTS["neutral"])
    prompts.parent.mkdir(parents=True)
    prompts.write_text(
        "".join(
            json.dumps({"prompt": {"text": t}}) + "\n"
            for t in ("Once upon a time", "The little dog", "She was")
        )
    )
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    cmd = [
        sys.executable,
        str(SCRIPT),
        *(
            "--adapter-path",
            str(tmp_path / "adapter"),
            "--assets",
            str(tmp_path / "assets"),
        ),
        *("--n-prompts", "3", "--samples", "2", "--max-tokens", "6"),
        *("--strengths=-2,0,2", "--actadd-layers", "1,3", "--actadd-strengths=-1,1"),
        *("--actadd-texts", "10", "--out", str(out), "--plot", str(png)),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(out.read_text())
    labels = [es.label(x) for x in r["results"]]
    assert labels == [
        "base",
        "braces -2",
        "braces +0",
        "braces +2",
        "actadd L1 -1",
        "actadd L1 +1",
        "actadd L3 -1",
        "actadd L3 +1",
    ]  # stories260K has no chat template: no prompting rows
    assert "Prompting baseline skipped" in p.stdout
    for x in r["results"]:
        assert 0 <= x["share"] <= 1 and x["share_se"] >= 0
        assert 0 <= x["mean_score"] <= 1
        assert math.isfinite(x["ppl"]) and x["ppl"] >= 1
        assert all(0 <= x[f"dist-{n}"] <= 1 for n in (1, 2, 3))
        assert x["tokens_per_second"] > 0 and x["speed_ratio"] > 0
        assert 0 <= x["mean_tokens"] <= 6
    assert r["results"][0]["speed_ratio"] == 1.0
    assert set(r["actadd"]) == {"1", "3"}
    assert r["scorer"]["validation"] and r["scorer"]["limits"]
    assert {b["family"] for b in r["equal_fluency"]["toward"]} == {
        "base",
        "braces",
        "actadd",
    }
    assert png.stat().st_size > 1000

    # --report merges runs: the baselines once, each file's braces rows named
    merged = tmp_path / "m.png"
    cmd = [sys.executable, str(SCRIPT), "--report", f"{out}:a", f"{out}:b"]
    p = subprocess.run([*cmd, "--plot", str(merged)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "| braces/a +2 |" in p.stdout and "| braces/b -2 |" in p.stdout
    assert p.stdout.count("| actadd L1 -1 |") == 1 and merged.stat().st_size > 1000
    # a baseline only the second file has is kept (e.g. another block's actadd)
    extra = json.loads(out.read_text())
    for x in extra["results"]:
        if x["method"] == "actadd" and x["layer"] == 1:
            x["layer"] = 2
    (tmp_path / "extra.json").write_text(json.dumps(extra))
    p = subprocess.run(
        [*cmd[:3], f"{out}:a", f"{tmp_path / 'extra.json'}:b"],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("| actadd L1 -1 |") == 1
    assert p.stdout.count("| actadd L2 -1 |") == 1
    other = json.loads(out.read_text())
    other["results"][0]["ppl"] += 1.0
    (tmp_path / "other.json").write_text(json.dumps(other))
    p = subprocess.run(
        [*cmd[:3], str(out), str(tmp_path / "other.json")],
        capture_output=True,
        text=True,
    )
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "its base row differs" in p.stderr


def test_unknown_attribute_is_one_line(tmp_path):
    model, _ = _braced()
    save_adapter(model, tmp_path, model=str(STORIES))
    cmd = [sys.executable, str(SCRIPT), "--adapter-path", str(tmp_path)]
    p = subprocess.run(
        [*cmd, "--attribute", "happy"], capture_output=True, text=True, timeout=300
    )
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip() == (
        "Error: --attribute 'happy': the adapter has positive, negative"
    )

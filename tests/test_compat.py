"""mlx-lm internals: every one mlx_braces touches exists as used, and only _compat touches them.

A new mlx-lm that renames or reshapes one of them fails here, by name, instead of
somewhere deep inside training, generation or the server.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
import importlib.util
import inspect
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from rich.console import Console
from rich.progress import Progress

import mlx_braces
from mlx_braces import _compat

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mlx_braces"
STORIES = PACKAGE / "assets" / "stories260K"


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def calls(fn, name: str) -> bool:
    """Whether the source of ``fn`` calls ``name(...)``."""
    return any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == name
        for n in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(fn))))
    )


# ---------------------------------------------------------------------------
# Every touched name, as _compat uses it


def test_pin_matches_installed_mlx_lm():
    import mlx_lm

    major, minor = (int(x) for x in mlx_lm.__version__.split(".")[:2])
    assert (major, minor) == (0, 32), f"mlx-lm {mlx_lm.__version__} is not pinned"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"mlx-lm{_compat.MLX_LM_VERSIONS}"' in pyproject


def test_clear_cache():
    from mlx_lm.tuner import trainer

    assert params(trainer._clear_cache) == ["threshold"], "trainer._clear_cache"
    a = mx.ones((1024, 1024))
    mx.eval(a + 1)
    del a
    assert mx.get_cache_memory() > 0
    _compat.clear_cache(1 << 40)  # under the threshold: kept
    assert mx.get_cache_memory() > 0
    _compat.clear_cache(0)
    assert mx.get_cache_memory() == 0


def test_gather_sort():
    from mlx_lm.models import switch_layers

    assert params(switch_layers._gather_sort) == ["x", "indices"]
    x = mx.arange(12, dtype=mx.float32).reshape(3, 1, 1, 4)  # (tokens, 1, 1, d)
    idx = mx.array([[2, 0], [1, 2], [0, 1]])  # (tokens, k)
    xs, ids, inv = _compat.gather_sort(x, idx)
    flat = np.array(idx).reshape(-1)
    order = np.argsort(flat, kind="stable")
    assert np.array(ids).tolist() == flat[order].tolist()  # grouped by expert
    np.testing.assert_array_equal(np.array(xs)[:, 0], np.array(x)[order // 2, 0, 0])
    np.testing.assert_array_equal(np.array(inv), np.argsort(order))


def test_parse_size():
    from mlx_lm import utils

    assert params(utils._parse_size) == ["x"], "utils._parse_size"
    assert _compat.parse_size("1500") == 1500
    assert _compat.parse_size("512M") == 512 * 10**6
    assert _compat.parse_size("2GB") == 2 * 10**9
    assert _compat.parse_size("1.5G") == 1_500_000_000


def test_yaml_loader():
    from mlx_lm import lora

    assert isinstance(lora.yaml_loader, type), "lora.yaml_loader"
    config = yaml.load("learning_rate: 1e-5\niters: 3\n", _compat.yaml_loader())
    assert config == {"learning_rate": 1e-5, "iters": 3}
    assert isinstance(config["learning_rate"], float)


def test_train_ui_private_attributes():
    from mlx_lm import cli_ui

    assert params(cli_ui.TrainUI.__init__) == ["self", "total_iters", "rank"]
    ui = cli_ui.TrainUI(7, 0)
    assert isinstance(ui._console, Console), "TrainUI._console"
    assert isinstance(ui._progress, Progress), "TrainUI._progress"
    assert ui._progress.tasks[0].id == ui._task, "TrainUI._task"
    assert ui._rank == 0, "TrainUI._rank"
    for method in ("__exit__", "advance", "val_task"):
        assert callable(getattr(cli_ui.TrainUI, method)), f"TrainUI.{method}"
    assert params(cli_ui.make_train_progress) == ["console", "disable"]


@pytest.mark.parametrize("rank", [0, 1])
def test_train_ui_prints_plain_lines_on_rank_0(rank, capsys):
    ui = _compat.TrainUI(4, rank, start=2)
    assert ui._progress.tasks[0].completed == 2  # resumed at iteration 2
    with ui:
        ui.print("Iter 3: Train loss 1.000, [not markup]")
        ui.advance()
    assert ui._progress.tasks[0].completed == 3
    out = capsys.readouterr().out
    expected = "Iter 3: Train loss 1.000, [not markup]\n"
    assert out == (expected if rank == 0 else "")


def test_server_names():
    import mlx_lm.server as server

    assert params(server._run_http_server) == [
        "host",
        "port",
        "response_generator",
        "server_class",
        "handler_class",
    ], "server._run_http_server"
    assert calls(server.run, "_run_http_server"), "server.run -> _run_http_server"
    assert calls(server.main, "ModelProvider"), "server.main -> ModelProvider"
    assert calls(server.ModelProvider._load, "load"), "ModelProvider._load -> load"
    assert issubclass(server.APIHandler, object) and callable(server.load)
    assert params(server.ModelProvider.load) == [
        "self",
        "model_path",
        "adapter_path",
        "draft_model_path",
    ]


def provider_args(model: str) -> argparse.Namespace:
    return argparse.Namespace(
        model=model,
        adapter_path=None,
        draft_model=None,
        pipeline=False,
        trust_remote_code=False,
        chat_template="",
        use_default_chat_template=False,
    )


def test_model_key_and_swapped_server_load():
    """mlx-lm's key is (model, adapter, draft) and it loads through module ``load``."""
    import mlx_lm.server as server

    loaded = []

    def load(path, **kwargs):
        loaded.append(path)
        return mlx_braces.load(path, **kwargs)

    class Handler(server.APIHandler):
        pass

    class Provider(server.ModelProvider):
        pass

    before = server.load, server.ModelProvider, server._run_http_server
    with _compat.serving(load, Provider, Handler):
        assert server.load is load and server.ModelProvider is Provider
        http = server._run_http_server
        assert isinstance(http, functools.partial)
        assert http.func is before[2] and http.keywords == {"handler_class": Handler}
        provider = server.ModelProvider(provider_args(str(STORIES)))
        provider.load("default_model")
    assert (server.load, server.ModelProvider, server._run_http_server) == before
    assert loaded == [str(STORIES)]
    assert provider.model_key == (str(STORIES), None, None)
    steered = (*provider.model_key, (("positive", 2.0),))
    assert _compat.base_model_key(steered) == provider.model_key


def test_generate_names():
    generate = importlib.import_module("mlx_lm.generate")
    assert calls(generate.main, "setup_arg_parser"), "generate.main -> setup_arg_parser"
    assert calls(generate.main, "load"), "generate.main -> load"
    assert isinstance(generate.DEFAULT_PROMPT, str)
    parser = generate.setup_arg_parser()
    assert isinstance(parser._actions, list), "ArgumentParser._actions"
    for dest in ("model", "prompt"):
        action = _compat.parser_action(parser, dest)
        assert isinstance(action, argparse.Action) and action.dest == dest
    with pytest.raises(RuntimeError, match="no option stores 'no_such_flag'"):
        _compat.parser_action(parser, "no_such_flag")


def test_evaluate_names():
    """``MLXLM.__init__`` loads through the module's ``load`` (read from source:
    importing ``mlx_lm.evaluate`` needs lm-eval, an optional dependency)."""
    spec = importlib.util.find_spec("mlx_lm.evaluate")
    tree = ast.parse(Path(spec.origin).read_text())
    imported = {
        a.asname or a.name
        for n in tree.body
        if isinstance(n, ast.ImportFrom)
        for a in n.names
    }
    assert "load" in imported, "mlx_lm.evaluate.load"
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MLXLM"]
    (init,) = [n for n in cls.body if getattr(n, "name", None) == "__init__"]
    assert [a.arg for a in init.args.args][:5] == [
        "self",
        "path_or_hf_repo",
        "max_tokens",
        "batch_size",
        "use_chat_template",
    ], "MLXLM.__init__"
    assert any(
        isinstance(n, ast.Call) and getattr(n.func, "id", None) == "load"
        for n in ast.walk(init)
    ), "MLXLM.__init__ -> load"


def test_dataset_data():
    from mlx_lm.tuner.datasets import (
        CacheDataset,
        ChatDataset,
        CompletionsDataset,
        ConcatenatedDataset,
        TextDataset,
        create_dataset,
    )

    config = argparse.Namespace()
    texts = [{"text": "a b", "attribute": "x"}, {"text": "c"}]
    chats = [{"messages": [{"role": "user", "content": "hi"}]}]
    completions = [{"prompt": "p", "completion": "c"}]
    for records, kind in ((texts, TextDataset), (chats, ChatDataset)) + (
        (completions, CompletionsDataset),
    ):
        ds = create_dataset(records, None, config)
        assert type(ds) is kind
        assert _compat.dataset_data(ds) is records, f"{kind.__name__}._data"
        assert _compat.dataset_records(CacheDataset(ds)) is records
    parts = [create_dataset(texts, None, config), create_dataset(chats, None, config)]
    assert _compat.dataset_data(ConcatenatedDataset(parts)) is parts
    assert _compat.dataset_data(object()) is None


def test_swapped_restores_and_names_what_is_missing():
    import mlx_lm.generate  # noqa: F401

    module = importlib.import_module("mlx_lm.generate")
    original = module.load
    with pytest.raises(KeyError):
        with _compat.swapped(module, load="swapped"):
            assert module.load == "swapped"
            raise KeyError("inside")
    assert module.load is original
    with pytest.raises(RuntimeError, match="mlx_lm.generate has no no_such_name"):
        with _compat.swapped(module, load="x", no_such_name=1):
            pass
    assert module.load is original and not hasattr(module, "no_such_name")


# ---------------------------------------------------------------------------
# Nothing but _compat reaches into mlx-lm

# Private attributes of mlx-lm (and argparse) objects that _compat reads.
PRIVATE_ATTRIBUTES = {
    "_actions",
    "_console",
    "_data",
    "_progress",
    "_rank",
    "_task",
    "_proc_data",
}


def _is_mlx_lm(module: str | None) -> bool:
    return module is not None and (module == "mlx_lm" or module.startswith("mlx_lm."))


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # the parent is a module, not a package
        return False


def _inherited_private(cls: type) -> set[str]:
    """Private names an mlx-lm class (and its mlx-lm bases) defines or sets on self."""
    names = set()
    for klass in cls.__mro__:
        if not _is_mlx_lm(klass.__module__):
            continue
        names.update(vars(klass))
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        names.update(
            n.attr
            for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and getattr(n.value, "id", None) == "self"
        )
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def reaches(source: str, where: str = "<source>") -> list[str]:
    """Each reach into mlx-lm internals in ``source``: private names, module patches."""
    tree = ast.parse(source)
    modules, objects, found = {}, {}, []  # local name -> "mlx_lm.x" / "mlx_lm.x.Y"
    for n in ast.walk(tree):  # names bound to mlx-lm modules
        if isinstance(n, ast.Import):
            for a in n.names:
                if _is_mlx_lm(a.name):
                    top = a.name if a.asname else a.name.split(".")[0]
                    modules[a.asname or top] = top
        elif isinstance(n, ast.ImportFrom) and _is_mlx_lm(n.module):
            for a in n.names:
                full = f"{n.module}.{a.name}"
                if a.name.startswith("_"):
                    found.append(f"{where}:{n.lineno}: imports {full}")
                elif _is_module(full):
                    modules[a.asname or a.name] = full
                else:
                    objects[a.asname or a.name] = (n.module, a.name)
        elif (
            isinstance(n, ast.Assign)
            and isinstance(n.value, ast.Call)
            and getattr(n.value.func, "attr", None) == "import_module"
            and n.value.args
            and isinstance(n.value.args[0], ast.Constant)
            and _is_mlx_lm(n.value.args[0].value)
        ):
            for t in n.targets:
                if isinstance(t, ast.Name):
                    modules[t.id] = n.value.args[0].value

    def on_module(node) -> bool:  # mlx_lm.server, _mlx, _mlx.ModelProvider, ...
        while isinstance(node, ast.Attribute):
            node = node.value
        return isinstance(node, ast.Name) and node.id in modules

    def resolve(node):  # the mlx-lm object an expression names, else None
        path = []
        while isinstance(node, ast.Attribute):
            path.insert(0, node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None
        if node.id in modules:
            obj = importlib.import_module(modules[node.id])
        elif node.id in objects:
            module, name = objects[node.id]
            obj = getattr(importlib.import_module(module), name)
        else:
            return None
        for attr in path:
            obj = getattr(obj, attr)
        return obj

    for n in ast.walk(tree):  # subclasses of mlx-lm classes: self._x of the base
        if not isinstance(n, ast.ClassDef):
            continue
        inherited = set()
        for base in n.bases:
            cls = resolve(base)
            if isinstance(cls, type):
                inherited |= _inherited_private(cls)
        for m in ast.walk(n):
            if (
                isinstance(m, ast.Attribute)
                and getattr(m.value, "id", None) == "self"
                and m.attr in inherited
            ):
                found.append(f"{where}:{m.lineno}: uses mlx-lm's self.{m.attr}")

    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute):
            private = n.attr.startswith("_") and not n.attr.startswith("__")
            if on_module(n.value) and private:
                found.append(f"{where}:{n.lineno}: uses mlx-lm's {n.attr}")
            elif n.attr in PRIVATE_ATTRIBUTES and not (
                isinstance(n.value, ast.Name) and n.value.id in ("self", "cls")
            ):
                found.append(f"{where}:{n.lineno}: reads .{n.attr}")
            if isinstance(n.ctx, (ast.Store, ast.Del)) and on_module(n.value):
                found.append(f"{where}:{n.lineno}: assigns {ast.unparse(n)}")
        elif isinstance(n, ast.Call) and getattr(n.func, "id", None) in (
            "setattr",
            "getattr",
            "hasattr",
            "delattr",
        ):
            args = n.args
            if n.func.id in ("setattr", "delattr") and args and on_module(args[0]):
                found.append(
                    f"{where}:{n.lineno}: {n.func.id} on {ast.unparse(args[0])}"
                )
            if (
                len(args) > 1
                and isinstance(args[1], ast.Constant)
                and args[1].value in PRIVATE_ATTRIBUTES
            ):
                found.append(f"{where}:{n.lineno}: {n.func.id} {args[1].value!r}")
        elif (
            isinstance(n, ast.Subscript)
            and isinstance(n.value, ast.Attribute)
            and n.value.attr == "model_key"
        ):
            found.append(f"{where}:{n.lineno}: indexes model_key")
    return found


@pytest.mark.parametrize(
    "source",
    [
        "from mlx_lm.utils import _parse_size",
        "from mlx_lm.tuner.trainer import _clear_cache, evaluate",
        "import mlx_lm.server as s\nf = s._run_http_server",
        "import mlx_lm.server as s\ns.load = print",
        "import mlx_lm.server\nmlx_lm.server.ModelProvider = object",
        "import importlib\ng = importlib.import_module('mlx_lm.generate')\ng.load = 1",
        "from mlx_lm import generate\nsetattr(generate, 'load', 1)",
        "for a in parser._actions: pass",
        "records = dataset._data",
        "records = getattr(dataset, '_data', None)",
        "self._progress = ui._progress",
        "key = self.model_key[:3]",
        "from mlx_lm.cli_ui import TrainUI\nclass UI(TrainUI):\n    def f(self):\n"
        "        return self._console",
        "import mlx_lm.server as s\nclass P(s.ModelProvider):\n    def f(self):\n"
        "        return self._model_map",
    ],
)
def test_reaches_are_found(source):
    assert reaches(source)


def test_compat_reaches_and_nothing_else_does():
    found = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        where = str(file.relative_to(ROOT))
        found[where] = reaches(file.read_text(), where)
    assert found.pop("mlx_braces/_compat.py"), "the checker misses _compat's reaches"
    assert not [r for rs in found.values() for r in rs], "\n".join(
        r for rs in found.values() for r in rs
    )
    not_reaching = (
        "import mlx_lm.server as s\nclass P(s.ModelProvider):\n    def f(self):\n"
        "        self._steering = self.model_key\n        return self._data"
    )
    assert not reaches(not_reaching)

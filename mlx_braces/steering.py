"""Conditional control: steer a braced model with attributes (METHOD.md §4).

An attribute ``c`` is a name and a list of words. Per braced layer ℓ:

- ``e_c`` (d,) is the mean of the frozen base model's layer-ℓ FFN input over the
  tokens of the attribute's words (stored in the adapter, never trained);
- ``h_c = MLP(e_c)`` with a small trainable MLP (:class:`Conditional`, which also
  holds the strengths and computes the layer's steering terms);
- ``r_c = (R W_V)ᵀ (R h_c) / sqrt(rank)`` with the layer's own ``R``, and the FFN
  computes ``W_V (w + g (r(x) + Σ_c s_c r_c))``.

Training sets ``s_c = +1`` for examples labelled with ``c`` (``"attribute": c``) and
0 for unlabelled ones; at generation ``steer(model, {c: s})`` picks any signed
strength. By default (``contrast``) the n >= 2 attributes of an adapter are
exclusive classes: ``s`` on ``c`` also puts ``-s/(n-1)`` on the others, in training
and at generation alike (see :func:`effective_strengths` for why). ``r_c`` does not
depend on the token, so ``Σ_c s_c r_c`` is computed once per (adapter, strengths)
and cached.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .braces import BracedFFN, braced_layers, parent_and_attr

ATTRIBUTES_DIR = Path(__file__).parent / "assets" / "attributes"
DEFAULT_HIDDEN_DIMS = 16


class SteeringError(ValueError):
    """A bad attribute definition, attribute label or steering request."""


NO_ATTRIBUTES = (
    "this adapter was trained without attributes, so it cannot steer; "
    "train one with --attributes FILE (e.g. --attributes sentiment)"
)


# ---------------------------------------------------------------------------
# Attribute definitions


def read_attributes(file: str | Path) -> dict[str, list[str]]:
    """Read ``{name: [words, ...]}`` from a YAML or JSON file (or a shipped name).

    A bare name such as ``sentiment`` picks ``mlx_braces/assets/attributes/NAME.yaml``.
    """
    path = Path(file)
    if not path.exists() and (ATTRIBUTES_DIR / f"{file}.yaml").is_file():
        path = ATTRIBUTES_DIR / f"{file}.yaml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in ATTRIBUTES_DIR.glob("*.yaml")))
        raise SteeringError(
            f"{file}: attribute file not found (shipped attribute sets: {shipped})"
        )
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError
        raise SteeringError(f"{path}: cannot parse ({e})") from None
    return check_attributes(data, path)


def check_attributes(
    data: Any, source: str | Path = "attributes"
) -> dict[str, list[str]]:
    """Validate ``{name: [words, ...]}``: non-empty names and non-empty word lists."""
    if not isinstance(data, Mapping) or not data:
        raise SteeringError(
            f"{source}: expected a mapping of attribute name -> list of words, "
            f"e.g. {{positive: [good, great], negative: [bad, awful]}}"
        )
    out = {}
    for name, words in data.items():
        if not isinstance(name, str) or not name.strip():
            raise SteeringError(
                f"{source}: attribute names must be strings, got {name!r}"
            )
        if isinstance(words, str):
            words = [words]
        if (
            not isinstance(words, Sequence)
            or not words
            or not all(isinstance(w, str) and w.strip() for w in words)
        ):
            raise SteeringError(
                f"{source}: attribute '{name}' must list one or more non-empty words, "
                f"got {words!r}"
            )
        out[name] = [w.strip() for w in words]
    return out


def tokenize_words(
    tokenizer: Any, attributes: Mapping[str, Sequence[str]]
) -> dict[str, list[list[int]]]:
    """Token ids of every word as it appears mid-sentence (after a space), no BOS.

    ``" " + word`` is encoded and leading whitespace-only tokens are dropped, so
    BPE tokenizers give the ``Ġword`` form and SentencePiece ones ``▁word``.
    """
    out = {}
    for name, words in attributes.items():
        out[name] = []
        for word in words:
            ids = list(tokenizer.encode(" " + word, add_special_tokens=False))
            while len(ids) > 1 and not tokenizer.decode(ids[:1]).strip():
                ids = ids[1:]
            if not ids or not tokenizer.decode(ids).strip():
                raise SteeringError(
                    f"attribute '{name}': word {word!r} tokenizes to nothing"
                )
            out[name].append(ids)
    return out


# ---------------------------------------------------------------------------
# e_c from the frozen base model


class _Capture(nn.Module):
    """Stands in for a braced FFN: keeps its input ``x``, runs the frozen base FFN."""

    def __init__(self, braced: BracedFFN):
        super().__init__()
        self.braced = braced

    def __call__(self, x: mx.array, *args, **kwargs) -> Any:
        self.x = x
        return self.braced.ffn(x, *args, **kwargs)  # delta unset: the base FFN


def attribute_embeddings(
    model: nn.Module,
    token_ids: Mapping[str, Sequence[Sequence[int]]],
    bos_token_id: int | None = None,
) -> list[mx.array]:
    """``e_c`` of every braced layer: (n_attr, d) fp32, in ``braced_layers`` order.

    Each word is run as its own sequence (``[BOS] + ids``, right-padded) through the
    frozen base model (every brace bypassed); ``e_c`` is the mean of the layer's FFN
    input over all tokens of all of ``c``'s words (BOS excluded).
    """
    layers = braced_layers(model)
    if not layers:
        raise SteeringError("Model has no braced layers: call apply_braces first.")
    prefix = [] if bos_token_id is None else [int(bos_token_id)]
    rows, owner = [], []
    for c, words in enumerate(token_ids.values()):
        for ids in words:
            rows.append(prefix + [int(i) for i in ids])
            owner.append(c)
    length = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), length), np.int32)
    weights = np.zeros((len(token_ids), len(rows), length), np.float32)
    for b, (row, c) in enumerate(zip(rows, owner)):
        tokens[b, : len(row)] = row
        weights[c, b, len(prefix) : len(row)] = 1.0
    weights /= weights.sum(axis=(1, 2), keepdims=True)

    captures = []
    for path, braced in layers:
        parent, attr = parent_and_attr(model, path)
        captures.append((parent, attr, braced, _Capture(braced)))
        setattr(parent, attr, captures[-1][-1])
    try:
        model(mx.array(tokens))
        W = mx.array(weights.reshape(len(token_ids), -1))  # (n_attr, B·L)
        out = [
            W @ cap.x.astype(mx.float32).reshape(W.shape[1], -1) for *_, cap in captures
        ]
        mx.eval(out)
    finally:
        for parent, attr, braced, _ in captures:
            setattr(parent, attr, braced)
    return out


# ---------------------------------------------------------------------------
# The conditional module


class _Strengths:
    """The strengths ``S`` a :class:`Conditional` applies (a plain object: no params)."""

    __slots__ = ("S",)

    def __init__(self):
        self.S: mx.array | None = None  # (n_attr,) or (B, n_attr)


class Conditional(nn.Module):
    """The conditional branch of one braced layer: ``e_c``, ``h_c = MLP(e_c)``, ``S``.

    ``e`` (n_attr, d) is a frozen buffer saved with the adapter. The MLP is
    ``Linear(d, h) -> SiLU -> Linear(h, d)`` (``2·d·h + h + d`` parameters); its last
    layer starts at zero, so ``r_c = 0`` and steering does nothing before training.
    ``strengths`` (``S``, set with :meth:`set_strengths`) is not a parameter. The
    braced layer calls :meth:`term` (training) or :meth:`offset` (inference).
    """

    def __init__(
        self,
        embeddings: mx.array,
        hidden_dims: int = DEFAULT_HIDDEN_DIMS,
        key: mx.array | None = None,
    ):
        super().__init__()
        d = embeddings.shape[1]
        self.e = embeddings.astype(mx.float32)  # (n_attr, d)
        self.up = nn.Linear(d, hidden_dims)
        self.out = nn.Linear(hidden_dims, d)
        bound = 1.0 / math.sqrt(d)
        self.up.weight = mx.random.uniform(-bound, bound, (hidden_dims, d), key=key)
        self.up.bias = mx.zeros((hidden_dims,))
        self.out.weight = mx.zeros((d, hidden_dims))
        self.out.bias = mx.zeros((d,))
        self.freeze(keys=["e"], recurse=False)
        self._strengths = _Strengths()

    @property
    def strengths(self) -> mx.array | None:
        """Attribute strengths ``S``: None, (n_attr,) for all rows, or (B, n_attr)."""
        return self._strengths.S

    def set_strengths(self, strengths: mx.array | None) -> None:
        """Set (or clear, with None) the strengths ``S`` used by the next calls."""
        n = self["e"].shape[0]
        if strengths is not None and (
            strengths.ndim not in (1, 2) or strengths.shape[-1] != n
        ):
            raise ValueError(
                f"steering strengths must have shape (n_attr,) or (B, n_attr) with "
                f"n_attr={n}, got {tuple(strengths.shape)}"
            )
        self._strengths.S = strengths

    def arrays(self) -> list[mx.array]:
        """Every array ``h_c`` depends on (the offset's cache key), found quickly."""
        up, out = self["up"], self["out"]
        return [self["e"], up["weight"], up["bias"], out["weight"], out["bias"]]

    def __call__(self) -> mx.array:
        """``h_c = MLP(e_c)``: (n_attr, d)."""
        return self.out(nn.silu(self.up(self.e)))

    def relevance(self, braced: BracedFFN) -> mx.array:
        """``r_c`` (n_attr, d_ff): the relevance in ``braced`` of every ``h_c``;
        (n_attr, E, d_ff), one ``r_c`` per expert, in a braced MoE block."""
        return braced.relevance(self())

    def term(self, braced: BracedFFN, x: mx.array) -> mx.array | None:
        """``S r_c`` fp32, broadcasting over ``x``'s rows (a dense layer's train path;
        an MoE block steers through :meth:`offset` in training too, since its ``r_c``
        differs per routed expert); None unsteered: (d_ff,) for one ``S``,
        (B, 1, ..., d_ff) for one per row."""
        S = self._strengths.S
        if S is None:
            return None
        return _per_row(S.astype(mx.float32) @ self.relevance(braced), x)

    def offset(self, braced: BracedFFN, x: mx.array) -> mx.array | None:
        """``(S h_c) Rᵀ`` fp32 (rank,) or (B, 1, ..., rank), None unsteered; kept in
        ``braced``'s cache outside training. ``S r_c`` is the relevance of this
        offset of ``R x``."""
        S = self._strengths.S
        if S is None:
            return None
        R = braced["R"]
        value = braced.cached(
            "steering",
            (R, S, *self.arrays()),
            lambda: (S.astype(mx.float32) @ self()) @ R.T,
        )
        return _per_row(value, x)


def _per_row(term: mx.array, x: mx.array) -> mx.array:
    """A (n,) term as is; a (B, n) one reshaped to broadcast over ``x``'s rows."""
    if term.ndim == 1:
        return term
    if term.shape[0] != x.shape[0]:
        raise ValueError(
            f"steering has {term.shape[0]} rows of strengths but the "
            f"batch has {x.shape[0]} rows"
        )
    return term.reshape(term.shape[0], *(1,) * (x.ndim - 2), -1)


class _AttributeSet:
    """An adapter's attribute words and labelling (a plain object: not in the tree)."""

    def __init__(
        self,
        attributes: Mapping[str, Sequence[str]],
        contrast: bool,
        steer_only: bool = False,
    ):
        self.attributes = {k: list(v) for k, v in attributes.items()}
        self.contrast = contrast and len(attributes) > 1
        self.steer_only = steer_only


def install_attributes(
    model: nn.Module,
    attributes: Mapping[str, Sequence[str]],
    embeddings: Sequence[mx.array] | None = None,
    hidden_dims: int = DEFAULT_HIDDEN_DIMS,
    contrast: bool = True,
    seed: int | None = None,
    steer_only: bool = False,
) -> nn.Module:
    """Give every braced layer a :class:`Conditional` (``cond``) for ``attributes``.

    ``embeddings`` are the per-layer ``e_c`` (zeros when None: an adapter's saved
    values are loaded over them). ``contrast``: see :func:`effective_strengths`.
    ``steer_only``: outside training the layers drop their unconditioned ``r(x)``
    and add only ``g·S r_c``, so unsteered the model is exactly the base; in
    training ``r(x)`` stays, to absorb the data's domain (dense FFNs only).
    Replaces any earlier attributes.
    """
    layers = braced_layers(model)
    if not layers:
        raise SteeringError("Model has no braced layers: call apply_braces first.")
    if not isinstance(hidden_dims, int) or hidden_dims <= 0:
        raise SteeringError(
            f"hidden_dims must be a positive integer, got {hidden_dims!r}"
        )
    n = len(attributes)
    if embeddings is None:
        embeddings = [mx.zeros((n, m.dims)) for _, m in layers]
    keys = (
        mx.random.split(mx.random.key(seed), len(layers)) if seed is not None else None
    )
    if steer_only:
        moe = [p for p, m in layers if m.num_experts]
        if moe:
            raise SteeringError(
                f"steer-only attributes brace dense FFNs only; {moe[0]} is a "
                "mixture of experts"
            )
    spec = _AttributeSet(attributes, contrast, bool(steer_only))
    for i, (_, braced) in enumerate(layers):
        if embeddings[i].shape != (n, braced.dims):
            raise SteeringError(
                f"attribute embeddings of layer {i} have shape "
                f"{tuple(embeddings[i].shape)}, expected {(n, braced.dims)}"
            )
        cond = Conditional(
            embeddings[i], hidden_dims, None if keys is None else keys[i]
        )
        cond.spec = spec
        cond.train(braced.training)
        braced.cond = cond  # unsteered: a new Conditional has no strengths
        braced.steer_only = spec.steer_only
    return model


def add_attributes(
    model: nn.Module,
    tokenizer: Any,
    attributes: Mapping[str, Sequence[str]] | str | Path,
    hidden_dims: int = DEFAULT_HIDDEN_DIMS,
    contrast: bool = True,
    seed: int | None = None,
    steer_only: bool = False,
) -> nn.Module:
    """Compute ``e_c`` from the frozen base model and install the conditional branch.

    ``attributes`` is ``{name: [words]}`` or a YAML/JSON file (or shipped set name);
    ``steer_only``: see :func:`install_attributes`.
    """
    if isinstance(attributes, (str, Path)):
        attributes = read_attributes(attributes)
    attributes = check_attributes(attributes)
    ids = tokenize_words(tokenizer, attributes)
    embeddings = attribute_embeddings(
        model, ids, getattr(tokenizer, "bos_token_id", None)
    )
    return install_attributes(
        model, attributes, embeddings, hidden_dims, contrast, seed, steer_only
    )


def _spec(model: nn.Module) -> _AttributeSet | None:
    layers = braced_layers(model)
    cond = layers[0][1].get("cond") if layers else None
    return None if cond is None else cond.spec


def attribute_config(model: nn.Module) -> dict[str, Any]:
    """Adapter config fields for ``model``'s attributes (empty without attributes)."""
    spec = _spec(model)
    if spec is None:
        return {}
    cond = braced_layers(model)[0][1].cond
    return {
        "attributes": spec.attributes,
        "attribute_parameters": {
            "hidden_dims": cond.up.weight.shape[0],
            "contrast": spec.contrast,
            "steer_only": spec.steer_only,
        },
    }


def attribute_names(model: nn.Module) -> list[str]:
    """The attributes ``model`` can be steered with, in adapter order ([] if none)."""
    spec = _spec(model)
    return [] if spec is None else list(spec.attributes)


# ---------------------------------------------------------------------------
# Steering


def effective_strengths(model: nn.Module, strengths: mx.array) -> mx.array:
    """The strengths the layers use: ``S`` itself, or its contrast (the default).

    With ``contrast`` (an adapter of n >= 2 mutually exclusive attributes, e.g.
    positive/negative), strength ``s`` on ``c`` also puts ``-s/(n-1)`` on every other
    attribute, in training (an example of ``c``: ``+1`` on ``c``) as at generation.
    The ``e_c`` of such attributes are nearly parallel (cosine 0.91-0.96 on
    stories260K), so one-hot labels teach every ``r_c`` the same text-domain
    direction; the contrast cancels it, and ``positive = -negative`` exactly.
    """
    spec = _spec(model)
    if spec is None or not spec.contrast:
        return strengths
    n = strengths.shape[-1]
    return strengths * (n / (n - 1)) - strengths.sum(axis=-1, keepdims=True) / (n - 1)


def _strength_row(names: list[str], strengths: Mapping[str, float]) -> list[float]:
    if not isinstance(strengths, Mapping):
        raise SteeringError(
            f"steering strengths must be a mapping attribute -> number, got {strengths!r}"
        )
    row = [0.0] * len(names)
    for name, s in strengths.items():
        if name not in names:
            raise SteeringError(
                f"unknown attribute {name!r}; this adapter's attributes: "
                + ", ".join(names)
            )
        if (
            isinstance(s, bool)
            or not isinstance(s, (int, float))
            or not math.isfinite(s)
        ):
            raise SteeringError(
                f"strength of attribute {name!r} must be a finite number, got {s!r}"
            )
        row[names.index(name)] = float(s)
    return row


def strengths_array(
    model: nn.Module,
    strengths: Mapping[str, float] | Sequence[Mapping[str, float] | None] | None,
) -> mx.array | None:
    """The layers' ``S`` for ``strengths``: (n_attr,), or (B, n_attr) for one per row."""
    if not isinstance(model, nn.Module):
        raise SteeringError(
            f"model must be an mlx.nn.Module (a braced model), got {type(model).__name__}"
        )
    if strengths is not None and (
        isinstance(strengths, (str, bytes))
        or not isinstance(strengths, (Mapping, list, tuple))
    ):
        raise SteeringError(
            "steering strengths must be a mapping attribute -> number (e.g. "
            f"{{'positive': 2.0}}), a list of them, or None; got {strengths!r}"
        )
    if not strengths:
        return None
    names = attribute_names(model)
    if not names:
        raise SteeringError(NO_ATTRIBUTES)
    if isinstance(strengths, Mapping):
        S = mx.array(_strength_row(names, strengths), dtype=mx.float32)
    else:
        S = mx.array(
            [_strength_row(names, s or {}) for s in strengths], dtype=mx.float32
        )
    S = effective_strengths(model, S)
    mx.eval(S)
    return S


def _conditionals(model: nn.Module) -> list[Conditional]:
    """The conditional branch of every braced layer ([] without attributes)."""
    return [c for _, m in braced_layers(model) if (c := m.get("cond")) is not None]


def steer(
    model: nn.Module,
    strengths: Mapping[str, float] | Sequence[Mapping[str, float] | None] | None,
) -> None:
    """Steer every later call of ``model``: ``{attribute: strength}`` (None/{}: stop).

    Strengths are signed: ``s > 0`` toward the attribute, ``s < 0`` away from it.
    A list of mappings steers each batch row on its own. Raises
    :class:`SteeringError` for unknown attributes or an adapter without attributes.
    """
    S = strengths_array(model, strengths)
    for cond in _conditionals(model):
        cond.set_strengths(S)


def steering(
    model: nn.Module,
    strengths: Mapping[str, float] | Sequence[Mapping[str, float] | None] | None,
) -> contextlib.AbstractContextManager[None]:
    """``with steering(model, {...}):`` steer inside the block, then restore."""
    return using_strengths(model, strengths_array(model, strengths))


@contextlib.contextmanager
def using_strengths(model: nn.Module, S: mx.array | None) -> Iterator[None]:
    """Every layer steered by ``S`` (effective strengths: (n_attr,) or (B, n_attr),
    or None) inside the block; the strengths before are restored after it."""
    conds = _conditionals(model)
    if S is not None and not conds:
        raise SteeringError(NO_ATTRIBUTES)
    before = [c.strengths for c in conds]
    try:
        for c in conds:
            c.set_strengths(S)
        yield
    finally:
        for c, s in zip(conds, before):
            c.set_strengths(s)


# ---------------------------------------------------------------------------
# Training with attribute labels


def attribute_labels(dataset: Any, key: str = "attribute") -> list[str | None]:
    """The ``key`` field of every record behind an mlx-lm dataset (None if absent).

    Unwraps ``CacheDataset`` -> ``TextDataset``/``ChatDataset``/... -> records.
    """
    from ._compat import dataset_records

    records = dataset_records(dataset)
    if len(records) != len(dataset) or (
        len(records) and not isinstance(records[0], Mapping)
    ):
        raise SteeringError(
            f"cannot find the records (with their {key!r} labels) behind {type(dataset).__name__}"
        )
    return [r.get(key) for r in records]


class AttributeDataset:
    """Adds each example's attribute strengths to a tokenized mlx-lm dataset.

    Items are ``(tokens, offset, strengths)``: ``strengths`` is the one-hot (n_attr,)
    row of the example's ``"attribute"`` (all zeros when it has none), so training
    uses ``s = +1`` for labelled text and the unconditioned branch alone otherwise.
    """

    def __init__(
        self,
        dataset: Any,
        names: Sequence[str],
        labels: Sequence[str | None] | None = None,
        key: str = "attribute",
        source: str = "example",
    ):
        self._data = dataset
        self.names = list(names)
        labels = attribute_labels(dataset, key) if labels is None else list(labels)
        self._rows = []
        for i, label in enumerate(labels):
            if label is not None and label not in self.names:
                raise SteeringError(
                    f"{source} {i + 1}: {key} {label!r} is not a defined attribute "
                    f"(defined: {', '.join(self.names)})"
                )
            self._rows.append([float(label == n) for n in self.names])
        self.labelled = sum(label is not None for label in labels)

    def __getitem__(self, idx: int) -> tuple[list[int], int, list[float]]:
        item = self._data[idx]
        tokens, offset = item if isinstance(item, tuple) else (item, 0)
        return tokens, offset, self._rows[idx]

    def __len__(self) -> int:
        return len(self._data)


def labelled(model: nn.Module, dataset: Any, source: str = "example") -> Any:
    """``dataset`` with per-row strengths from its labels if ``model`` has attributes.

    An :class:`AttributeDataset` for an adapter with attributes (so its loss is the
    steered one, in training, validation and testing alike); else ``dataset`` itself,
    as it is when its items already carry strengths.
    """
    names = attribute_names(model)
    if not names or not dataset or isinstance(dataset, AttributeDataset):
        return dataset
    first = dataset[0]
    if isinstance(first, tuple) and len(first) == 3:  # already (tokens, offset, S)
        return dataset
    return AttributeDataset(dataset, names, source=source)


def prepare_training(
    model: nn.Module,
    tokenizer: Any,
    attributes: Mapping[str, Sequence[str]] | str | Path,
    train_set: Any,
    valid_set: Any = None,
    hidden_dims: int = DEFAULT_HIDDEN_DIMS,
    seed: int | None = None,
    steer_only: bool = False,
) -> tuple[Any, Any]:
    """Add ``attributes`` to a braced ``model`` and label its training data.

    Returns ``(train_set, valid_set)`` as :class:`AttributeDataset`: their batches
    carry per-row strengths, which ``mlx_braces.trainer``'s loss steers by.
    """
    add_attributes(
        model, tokenizer, attributes, hidden_dims, seed=seed, steer_only=steer_only
    )
    names = attribute_names(model)
    train_set = AttributeDataset(train_set, names, source="training example")
    if not train_set.labelled:
        raise SteeringError(
            "no training example has an 'attribute' field; label the lines of "
            f"train.jsonl with one of: {', '.join(names)}"
        )
    return train_set, labelled(model, valid_set, "validation example")

"""mlx-lm's OpenAI-compatible server, serving braces adapters and per-request steering.

``mlx_lm.server.main`` runs unchanged (same flags and endpoints) with three of its
names swapped for the duration: ``load`` (:func:`mlx_braces.load`, so braces adapters
load), ``ModelProvider`` and the HTTP handler (below, for steering).

A request may carry ``"steering": {"positive": 2.0}``. The steering becomes part of the
requested adapter, hence of mlx-lm's model key: requests with different steering are
never batched together and never share a prompt cache, and switching between them
re-steers the loaded model in place (no reload).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlx_lm.server as _mlx

from ._compat import base_model_key, serving
from .adapters import (
    AdapterError,
    check_base_gguf,
    is_braces_adapter,
    recorded_model,
)
from .loading import ModelLoadError, check_model_available
from .loading import load as braces_load
from .models import ModelError, resolve_model


@dataclass(frozen=True)
class SteeredAdapter:
    """A request's adapter path with its steering: the ``adapter`` of mlx-lm's key."""

    path: str | None
    steering: tuple[tuple[str, float], ...]


def parse_steering(value: Any) -> tuple[tuple[str, float], ...]:
    """``{"name": strength}`` from a request body, as a sorted hashable tuple."""
    if not isinstance(value, dict) or not all(
        isinstance(k, str)
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
        for k, v in value.items()
    ):
        raise ValueError(
            "steering must be an object of attribute name -> finite number, e.g. "
            '{"positive": 2.0}'
        )
    return tuple(sorted((k, float(v)) for k, v in value.items()))


class ModelProvider(_mlx.ModelProvider):
    """mlx-lm's provider; the model key also holds the steering of the request."""

    def __init__(self, cli_args):
        if cli_args.model is None and cli_args.adapter_path is not None:
            cli_args.model = recorded_model(cli_args.adapter_path)
        if cli_args.adapter_path is not None:
            is_braces_adapter(cli_args.adapter_path)  # a bad config fails at startup
        if cli_args.model is not None:  # fetch/convert a named model or .gguf now
            if cli_args.adapter_path is not None:
                check_base_gguf(cli_args.adapter_path, cli_args.model)
            check_model_available(resolve_model(cli_args.model))
        super().__init__(cli_args)
        self._steering = ()

    def reset(self) -> None:
        super().reset()
        self._steering = ()  # a freshly loaded model is unsteered

    def load(self, model_path, adapter_path=None, draft_model_path=None):
        steering = ()
        if isinstance(adapter_path, SteeredAdapter):
            adapter_path, steering = adapter_path.path, adapter_path.steering
        if self.model_key is not None:
            self.model_key = base_model_key(self.model_key)
        model, tokenizer = super().load(model_path, adapter_path, draft_model_path)
        if steering != self._steering:
            from .steering import steer

            self._steering = None  # unknown if steer fails half way
            steer(model, dict(steering))
            self._steering = steering
        self.model_key = (*self.model_key, steering)
        return model, tokenizer


class APIHandler(_mlx.APIHandler):
    """mlx-lm's handler; reads the ``steering`` field of a request body."""

    def validate_model_parameters(self) -> None:
        super().validate_model_parameters()
        if self.body.get("steering") is not None:
            steering = parse_steering(self.body["steering"])
            if steering:  # {} is no steering: keep the request batchable with others
                self.adapter = SteeredAdapter(self.adapter, steering)


def main() -> None:
    """``mlx_lm.server`` with braces adapters; its flags, with ``load`` swapped."""
    try:
        with serving(braces_load, ModelProvider, APIHandler):
            _mlx.main()
    except (AdapterError, ModelError, ModelLoadError) as e:
        raise SystemExit(f"Error: {e}") from None


if __name__ == "__main__":
    main()

"""Convert llama2.c checkpoints and tokenizers into mlx-lm model folders.

`llama2.c <https://github.com/karpathy/llama2.c>`_ stores a model as one flat
float32 ``.bin`` file and its SentencePiece-derived BPE vocabulary as a second
``.bin`` file. This module reads both with NumPy and writes a folder that
``mlx_lm.load`` opens offline:

* ``config.json``: an mlx-lm ``llama`` config. ``rope_traditional`` is true
  because llama2.c rotates adjacent (even, odd) pairs of each head.
* ``model.safetensors``: the weights under mlx-lm's llama parameter names.
* ``tokenizer.json`` / ``tokenizer_config.json`` / ``special_tokens_map.json``:
  a Hugging Face ``tokenizers`` BPE model that encodes exactly like llama2.c's
  ``encode`` (dummy-prefix space, per-codepoint lookup with byte fallback, then
  greedy merging of the adjacent pair whose merged piece scores highest) and
  decodes like its ``decode`` (byte tokens become raw bytes, the leading space
  of the first piece is dropped).
* ``README.md``: where the files came from, with their sha256.

Supported checkpoint formats: the legacy (v0) header of seven int32 (a
negative ``vocab_size`` means an untied classifier follows the RoPE tables)
and the float32 ``export.py --version 1`` format (``ak42`` magic). The int8
``--version 2`` format is not supported.

Command line: ``python scripts/convert_llama2c.py CHECKPOINT TOKENIZER OUT_DIR``
or ``python -m mlx_braces.conversion.llama2c CHECKPOINT TOKENIZER OUT_DIR``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

V1_MAGIC = 0x616B3432  # "ak42", written by llama2.c export.py --version 1/2
V1_HEADER_BYTES = 256
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2  # fixed by llama2.c's run.c
BYTE_OFFSET = 3  # run.c: byte b falls back to token id b + 3
# run.c starts the merge search at best_score = -1e10 and only takes strictly
# greater scores, so a piece scoring <= -1e10 is never produced by a merge.
MIN_MERGE_SCORE = np.float32(-1e10)
SPECIAL_NAMES = {UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>"}
DTYPES = ("float32", "float16", "bfloat16")

# Known inputs: a folder converted from these gets the full attribution card.
STORIES260K_SHA256 = {
    "checkpoint": "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696",
    "tokenizer": "037cb335abb25d1fa9e8ecae30ed2a3a8ace9302862ebcdc05d51a6bbb10c312",
}

STORIES260K_CARD = """\
# stories260K (llama2.c tinyllamas), converted for mlx-lm

A **260K-parameter toy** Llama-architecture language model trained by
Andrej Karpathy on TinyStories (`dim=64`, `hidden_dim=172`, 5 layers, 8 query
heads sharing 4 key/value heads, a 512-token custom SentencePiece BPE
vocabulary, 512-token context). It writes short, repetitive children's
stories and is meant for tests and demos, not for real use. llama2.c's
`doc/stories260K.md` says it reaches a validation loss of 1.2968.

## Source and licence

* Model: "stories260K" from Andrej Karpathy's tinyllamas
  (https://huggingface.co/karpathy/tinyllamas), trained with
  https://github.com/karpathy/llama2.c (MIT licence,
  Copyright (c) 2023 Andrej Karpathy).
* The exact files converted, `stories260K.bin` and `tok512.bin`, were taken
  byte for byte from https://github.com/ytmytm/llama2.c64 at commit
  12b5bec82eb980362b8a7bfe86992a552a492481 (README: "License: MIT"; it says the
  files are the original tinyllamas stories260K files).
* These converted weights and tokenizer are redistributed under the MIT
  licence of their source.

## What the conversion did

`mlx_braces/conversion/llama2c.py` (`scripts/convert_llama2c.py`) renamed the
llama2.c tensors to mlx-lm's llama names without changing any value, dropped the
unused RoPE tables, and rebuilt the tokenizer as a Hugging Face `tokenizers`
BPE model (`tokenizer.json`) that encodes and decodes exactly like llama2.c.
`rope_traditional` is true in `config.json` because llama2.c rotates adjacent
pairs. The folder is for mlx-lm: Hugging Face transformers' `LlamaForCausalLM`
does not read that flag and would compute a different (wrong) model.
Greedy decoding from BOS for 256 steps reproduces, token for token, the text
in llama2.c's `doc/stories260K.md`.

The model ends a story by emitting BOS (id 1); llama2.c's `run` stops there.
`config.json` therefore lists `eos_token_id: [2, 1]` so that mlx-lm also stops
at BOS.
"""


@dataclass(frozen=True)
class Llama2cConfig:
    """Hyperparameters from a llama2.c checkpoint header."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool
    version: int = 0

    @property
    def head_size(self) -> int:
        """Per-head dimension (``dim // n_heads``)."""
        return self.dim // self.n_heads


@dataclass(frozen=True)
class Llama2cTokenizer:
    """A llama2.c ``.bin`` tokenizer: byte strings and their merge scores."""

    pieces: list[bytes]
    scores: list[float]
    max_token_length: int


def _validate_config(cfg: Llama2cConfig) -> None:
    dims = (cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads)
    if min(dims + (cfg.vocab_size, cfg.seq_len)) <= 0:
        raise ValueError(f"Invalid llama2.c header: {cfg}")
    if cfg.dim % cfg.n_heads or cfg.n_heads % cfg.n_kv_heads or cfg.head_size % 2:
        raise ValueError(
            "Invalid llama2.c header: need dim % n_heads == 0, "
            f"n_heads % n_kv_heads == 0 and an even head size, got {cfg}"
        )


class _FloatReader:
    """Sequential reader of float32 tensors from a flat buffer."""

    def __init__(self, data: np.ndarray, path: Path) -> None:
        self.data = data
        self.pos = 0
        self.path = path

    def take(self, *shape: int) -> np.ndarray:
        n = math.prod(shape)
        if self.pos + n > self.data.size:
            raise ValueError(f"{self.path}: file too short for the header's shapes")
        out = self.data[self.pos : self.pos + n].reshape(shape)
        self.pos += n
        return out

    def skip(self, n: int) -> None:
        self.take(n)

    def finish(self) -> None:
        left = self.data.size - self.pos
        if left:
            raise ValueError(
                f"{self.path}: {left} float32 values left after the last tensor; "
                "the header does not describe this file"
            )


def read_checkpoint(path: str | Path) -> tuple[Llama2cConfig, dict[str, np.ndarray]]:
    """Read a llama2.c float32 checkpoint.

    Args:
        path: A legacy (v0) or ``export.py --version 1`` ``.bin`` file.

    Returns:
        The header as a :class:`Llama2cConfig` and the weights as float32 arrays
        under mlx-lm llama names (``model.embed_tokens.weight``, ...). Matrices
        keep llama2.c's ``(out, in)`` layout, which is ``nn.Linear``'s.
        ``lm_head.weight`` is present only for an untied classifier.
    """
    path = Path(path)
    raw = path.read_bytes()
    if len(raw) < 28:
        raise ValueError(f"{path}: too short to be a llama2.c checkpoint")
    (magic,) = struct.unpack_from("<I", raw, 0)
    if magic == V1_MAGIC:
        (version,) = struct.unpack_from("<i", raw, 4)
        if version != 1:
            raise ValueError(
                f"{path}: llama2.c format version {version} is not supported "
                "(only the legacy format and float32 version 1)"
            )
        params = struct.unpack_from("<7i", raw, 8)
        shared = bool(raw[36])
        offset = V1_HEADER_BYTES
    else:
        version = 0
        params = struct.unpack_from("<7i", raw, 0)
        shared = params[5] > 0  # negative vocab_size: untied classifier follows
        params = params[:5] + (abs(params[5]),) + params[6:]
        offset = 28
    cfg = Llama2cConfig(*params, shared_classifier=shared, version=version)
    _validate_config(cfg)
    if (len(raw) - offset) % 4:
        raise ValueError(f"{path}: size is not a whole number of float32 values")

    r = _FloatReader(np.frombuffer(raw, dtype="<f4", offset=offset), path)
    L, D, H, V = cfg.n_layers, cfg.dim, cfg.hidden_dim, cfg.vocab_size
    q_dim, kv_dim = cfg.n_heads * cfg.head_size, cfg.n_kv_heads * cfg.head_size
    t: dict[str, np.ndarray] = {}
    if version == 0:
        t["embed"] = r.take(V, D)
        t["rms_att"] = r.take(L, D)
        t["wq"], t["wk"] = r.take(L, q_dim, D), r.take(L, kv_dim, D)
        t["wv"], t["wo"] = r.take(L, kv_dim, D), r.take(L, D, q_dim)
        t["rms_ffn"] = r.take(L, D)
        t["w1"], t["w2"], t["w3"] = r.take(L, H, D), r.take(L, D, H), r.take(L, H, D)
        t["rms_final"] = r.take(D)
        r.skip(cfg.seq_len * cfg.head_size)  # freq_cis real + imag tables
    else:
        t["rms_att"], t["rms_ffn"], t["rms_final"] = (
            r.take(L, D),
            r.take(L, D),
            r.take(D),
        )
        t["embed"] = r.take(V, D)
        t["wq"], t["wk"] = r.take(L, q_dim, D), r.take(L, kv_dim, D)
        t["wv"], t["wo"] = r.take(L, kv_dim, D), r.take(L, D, q_dim)
        t["w1"], t["w2"], t["w3"] = r.take(L, H, D), r.take(L, D, H), r.take(L, H, D)
    if not shared:
        t["wcls"] = r.take(V, D)
    r.finish()

    weights = {
        "model.embed_tokens.weight": t["embed"],
        "model.norm.weight": t["rms_final"],
    }
    names = {
        "input_layernorm.weight": "rms_att",
        "self_attn.q_proj.weight": "wq",
        "self_attn.k_proj.weight": "wk",
        "self_attn.v_proj.weight": "wv",
        "self_attn.o_proj.weight": "wo",
        "post_attention_layernorm.weight": "rms_ffn",
        "mlp.gate_proj.weight": "w1",
        "mlp.down_proj.weight": "w2",
        "mlp.up_proj.weight": "w3",
    }
    for i in range(L):
        for name, key in names.items():
            weights[f"model.layers.{i}.{name}"] = t[key][i]
    if not shared:
        weights["lm_head.weight"] = t["wcls"]
    return cfg, {k: np.ascontiguousarray(v) for k, v in weights.items()}


def read_tokenizer(path: str | Path, vocab_size: int | None = None) -> Llama2cTokenizer:
    """Read a llama2.c ``.bin`` tokenizer.

    The format is an int32 ``max_token_length``, then for every token a float32
    score, an int32 byte length and the bytes (spaces are ``' '``, not ``'▁'``).

    Args:
        path: The tokenizer file.
        vocab_size: Expected number of tokens (the checkpoint's); ``None``
            reads to the end of the file.
    """
    path = Path(path)
    raw = path.read_bytes()
    if len(raw) < 4:
        raise ValueError(f"{path}: too short to be a llama2.c tokenizer")
    (max_token_length,) = struct.unpack_from("<i", raw, 0)
    pos, pieces, scores = 4, [], []
    while pos < len(raw) and (vocab_size is None or len(pieces) < vocab_size):
        if pos + 8 > len(raw):
            raise ValueError(f"{path}: truncated token record at byte {pos}")
        score, length = struct.unpack_from("<fi", raw, pos)
        pos += 8
        if length < 0 or pos + length > len(raw):
            raise ValueError(f"{path}: bad token length {length} at byte {pos - 4}")
        pieces.append(raw[pos : pos + length])
        scores.append(score)
        pos += length
    if vocab_size is not None and len(pieces) != vocab_size:
        raise ValueError(
            f"{path}: {len(pieces)} tokens, the checkpoint has {vocab_size}"
        )
    if pos != len(raw):
        raise ValueError(
            f"{path}: {len(raw) - pos} bytes left after {len(pieces)} tokens"
        )
    return Llama2cTokenizer(pieces, scores, max_token_length)


def _token_names(tok: Llama2cTokenizer) -> tuple[list[str], list[str]]:
    """(llama2.c strings, Hugging Face token names) of every id, checked."""
    if len(tok.pieces) < BYTE_OFFSET + 256:
        raise ValueError("A llama2.c tokenizer needs ids 0-2 special and 3-258 bytes")
    try:
        pieces = [p.decode("utf-8") for p in tok.pieces]
    except UnicodeDecodeError as e:
        raise ValueError(f"Token is not valid UTF-8: {e}") from e
    for b in range(256):
        if pieces[BYTE_OFFSET + b] != f"<0x{b:02X}>":
            raise ValueError(
                f"Token {BYTE_OFFSET + b} is {pieces[BYTE_OFFSET + b]!r}, "
                f"expected the byte-fallback token <0x{b:02X}>"
            )
    names = list(pieces)
    names[:3] = [SPECIAL_NAMES[i] for i in range(3)]
    if len(set(names)) != len(names) or len(set(pieces)) != len(pieces):
        raise ValueError("The tokenizer has duplicate tokens")
    return pieces, names


def build_merges(tok: Llama2cTokenizer) -> list[tuple[str, str]]:
    """BPE merges, best first, that reproduce llama2.c's greedy merging.

    run.c's ``encode`` merges, at every step, the adjacent pair whose
    concatenation is a vocabulary piece with the highest score. So every split
    of every piece into two pieces is a merge, ranked by the score of the
    merged piece (as Hugging Face's ``LlamaConverter`` derives them from a
    SentencePiece model; ties broken by ids).
    """
    pieces, names = _token_names(tok)
    ids = {p: i for i, p in enumerate(pieces)}
    scores = np.asarray(tok.scores, dtype=np.float32)
    merges = []
    for i, piece in enumerate(pieces):
        if not scores[i] > MIN_MERGE_SCORE:  # also skips NaN, as run.c does
            continue
        for cut in range(1, len(piece)):
            left, right = ids.get(piece[:cut]), ids.get(piece[cut:])
            if left is not None and right is not None:
                merges.append((-float(scores[i]), i, left, right))
    merges.sort()
    return [(names[left], names[right]) for _, _, left, right in merges]


def build_tokenizer_json(tok: Llama2cTokenizer) -> dict:
    """A Hugging Face ``tokenizer.json`` equivalent to llama2.c's tokenizer.

    * Model: BPE over the llama2.c pieces with spaces kept as ``' '`` (no
      ``'▁'``), so input is looked up exactly as run.c does; characters
      missing from the vocabulary fall back to ``<0xXX>`` byte tokens.
    * Normalizer: ``Prepend(' ')``, run.c's dummy prefix (skipped for ``''``).
      No pre-tokenizer: run.c merges across the whole string.
    * Post-processor: prepend ``<s>`` (id 1), as run.c's ``encode(bos=1)``.
    * Decoder: the standard SentencePiece sequence (``▁`` to space, bytes,
      fuse, strip one leading space), which mlx-lm recognises for its fast
      streaming detokenizer.
    """
    pieces, names = _token_names(tok)
    added = [
        {
            "id": i,
            "content": SPECIAL_NAMES[i],
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i in (UNK_ID, BOS_ID, EOS_ID)
    ]
    decoders = [
        {"type": "ByteFallback"},
        {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0},
    ]
    if not any("\u2581" in p for p in pieces):
        # Harmless no-op on this vocabulary; matches the SentencePiece decoder.
        decoders.insert(
            0, {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}
        )
    bos = SPECIAL_NAMES[BOS_ID]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Prepend", "prepend": " "},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [BOS_ID], "tokens": [bos]}},
        },
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": SPECIAL_NAMES[UNK_ID],
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": {name: i for i, name in enumerate(names)},
            "merges": [list(m) for m in build_merges(tok)],
        },
    }


def build_tokenizer_config(seq_len: int) -> dict:
    """``tokenizer_config.json`` for ``transformers.AutoTokenizer``.

    ``PreTrainedTokenizerFast`` makes transformers use ``tokenizer.json`` as is
    (``LlamaTokenizer`` would rebuild a Metaspace pipeline). Special-token text
    such as ``"<s>"`` inside the input is encoded as ordinary characters, as in
    llama2.c, and decoding does not touch spaces around punctuation.
    """
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_NAMES[BOS_ID],
        "eos_token": SPECIAL_NAMES[EOS_ID],
        "unk_token": SPECIAL_NAMES[UNK_ID],
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
        "model_max_length": seq_len,
        "added_tokens_decoder": {
            str(i): {
                "content": SPECIAL_NAMES[i],
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i in (UNK_ID, BOS_ID, EOS_ID)
        },
    }


def build_config(cfg: Llama2cConfig, dtype: str = "float32") -> dict:
    """mlx-lm ``config.json`` (``model_type: llama``) for a llama2.c header."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_size,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_traditional": True,
        "tie_word_embeddings": cfg.shared_classifier,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": BOS_ID,
        # llama2.c delimits sequences with BOS and run.c stops when it is sampled.
        "eos_token_id": [EOS_ID, BOS_ID],
        "torch_dtype": dtype,
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _model_card(
    checkpoint: Path, tokenizer: Path, cfg: Llama2cConfig, dtype: str
) -> str:
    sums = {"checkpoint": _sha256(checkpoint), "tokenizer": _sha256(tokenizer)}
    if sums == STORIES260K_SHA256:
        card = STORIES260K_CARD
    else:
        card = (
            f"# {checkpoint.stem}, converted from llama2.c for mlx-lm\n\n"
            "Converted with `mlx_braces/conversion/llama2c.py`. Add the source, "
            "licence and attribution of the original checkpoint here.\n"
        )
    n_params = cfg.vocab_size * cfg.dim * (1 if cfg.shared_classifier else 2)
    n_params += cfg.dim + cfg.n_layers * (
        2 * cfg.dim
        + 2 * cfg.dim * cfg.n_heads * cfg.head_size
        + 2 * cfg.dim * cfg.n_kv_heads * cfg.head_size
        + 3 * cfg.dim * cfg.hidden_dim
    )
    return (
        f"{card}\n## Conversion inputs\n\n"
        f"| file | sha256 |\n| --- | --- |\n"
        f"| `{checkpoint.name}` | `{sums['checkpoint']}` |\n"
        f"| `{tokenizer.name}` | `{sums['tokenizer']}` |\n\n"
        f"llama2.c format version {cfg.version}; {n_params:,} parameters "
        f"(without the RoPE tables); saved as {dtype}.\n"
    )


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(
        json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def write_model_folder(
    checkpoint: str | Path,
    tokenizer: str | Path,
    out_dir: str | Path,
    dtype: str = "float32",
) -> Path:
    """Convert a llama2.c checkpoint and tokenizer into an mlx-lm model folder.

    Args:
        checkpoint: llama2.c model ``.bin``.
        tokenizer: llama2.c tokenizer ``.bin`` with the checkpoint's vocab size.
        out_dir: Folder to create or overwrite files in.
        dtype: ``float32`` (lossless), ``float16`` or ``bfloat16``.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.
    """
    import mlx.core as mx

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    checkpoint, tokenizer, out_dir = Path(checkpoint), Path(tokenizer), Path(out_dir)
    cfg, weights = read_checkpoint(checkpoint)
    tok = read_tokenizer(tokenizer, cfg.vocab_size)
    tokenizer_json = build_tokenizer_json(tok)

    out_dir.mkdir(parents=True, exist_ok=True)
    mx_dtype = getattr(mx, dtype)
    arrays = {k: mx.array(v).astype(mx_dtype) for k, v in sorted(weights.items())}
    mx.save_safetensors(
        str(out_dir / "model.safetensors"), arrays, metadata={"format": "mlx"}
    )
    _write_json(out_dir / "config.json", build_config(cfg, dtype))
    _write_json(out_dir / "tokenizer.json", tokenizer_json)
    _write_json(out_dir / "tokenizer_config.json", build_tokenizer_config(cfg.seq_len))
    _write_json(
        out_dir / "special_tokens_map.json",
        {
            name: SPECIAL_NAMES[i]
            for name, i in (("bos_token", 1), ("eos_token", 2), ("unk_token", 0))
        },
    )
    (out_dir / "README.md").write_text(
        _model_card(checkpoint, tokenizer, cfg, dtype), encoding="utf-8"
    )
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        description="Convert a llama2.c checkpoint + tokenizer to an mlx-lm model folder."
    )
    parser.add_argument("checkpoint", type=Path, help="llama2.c model .bin")
    parser.add_argument("tokenizer", type=Path, help="llama2.c tokenizer .bin")
    parser.add_argument("out_dir", type=Path, help="output model folder")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    args = parser.parse_args(argv)
    out = write_model_folder(args.checkpoint, args.tokenizer, args.out_dir, args.dtype)
    cfg = json.loads((out / "config.json").read_text())
    print(
        f"Wrote {out}: {cfg['num_hidden_layers']} layers, dim {cfg['hidden_size']}, "
        f"vocab {cfg['vocab_size']}, tied={cfg['tie_word_embeddings']}, {args.dtype}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

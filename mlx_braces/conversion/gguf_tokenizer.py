"""Hugging Face tokenizer files, built from GGUF metadata, that tokenize like llama.cpp.

``tokenizer_files(meta)`` returns the contents of ``tokenizer.json``,
``tokenizer_config.json`` and ``special_tokens_map.json`` for an mlx-lm model
folder. The reference is llama.cpp's ``src/llama-vocab.cpp``:

* ``tokenizer.ggml.model = gpt2``: byte-level BPE with the GGUF's merges, and the
  pre-tokenizer regexes llama.cpp uses for ``tokenizer.ggml.pre`` (each regex
  splits the previous pieces, matches and gaps both kept: ``Split(Isolated)``).
* ``tokenizer.ggml.model = llama``: SentencePiece vocabularies. llama.cpp's SPM
  tokenizer repeatedly merges the adjacent pair whose concatenation is a token
  with the highest score, over the whole text with spaces as ``▁``, and falls
  back to ``<0xXX>`` byte tokens. That is a BPE whose merges are every split of
  every token into two tokens, ranked by the merged token's score (as
  transformers' ``convert_slow_tokenizer`` derives them).
* Control (3) and unknown (2) tokens become special added tokens, user-defined
  (4) ones non-special added tokens, all matched in the raw text before the
  model runs, as llama.cpp's ``tokenizer_st_partition`` does. Encoding parses
  special-token text (llama.cpp's ``parse_special=true``); passing
  ``split_special_tokens=True`` gives ``parse_special=false``.
"""

from __future__ import annotations

from typing import Any

from .gguf import GGUFError

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")

# tokenizer.ggml.pre -> (regexes, ignore_merges, default add_bos, clean_spaces),
# transcribed from llama-vocab.cpp (llama-cpp-python 0.3.36).
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool, bool, bool]] = {
    "default": (_DEFAULT, False, False, True),
    **{
        name: ((_LLAMA3,), True, True, True)
        for name in (
            "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
            "midm-2.0", "lfm2",
        )
    },
    "dbrx": ((_LLAMA3,), False, False, True),
    "smaug-bpe": ((_LLAMA3,), False, False, True),
    **{
        name: ((_GPT2,), False, False, True)
        for name in (
            "gpt-2", "phi-2", "mpt", "olmo", "gigachat", "a.x-4.0", "mellum", "exaone4",
        )
    },
    "trillion": ((_GPT2,), False, False, False),
    "granite-docling": ((_GPT2,), False, False, False),
    **{
        name: ((_QWEN2,), False, False, False)
        for name in (
            "qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "hunyuan", "solar-open",
        )
    },
    "stablelm2": ((_QWEN2,), False, False, True),
    "megrez": ((_QWEN2,), False, False, True),
    **{
        name: ((r"\p{N}", _GPT2), False, False, True)
        for name in (
            "starcoder", "refact", "codeshell", "exaone", "minerva-7b", "mellum2",
        )
    },
    "smollm": ((r"\p{N}", _GPT2), False, False, False),
    "command-r": ((r"\p{N}", _GPT2), False, False, False),
}  # fmt: skip

_NO_ID = object()


def _get(meta: dict[str, Any], key: str, kind: type, default: Any = _NO_ID) -> Any:
    """meta[key] checked to be a ``kind`` (lists: of str/int/float), or default."""
    if key not in meta:
        if default is _NO_ID:
            raise GGUFError(f"GGUF metadata has no {key} (needed for the tokenizer)")
        return default
    value = meta[key]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise GGUFError(
            f"GGUF metadata {key}: expected {kind.__name__}, got {type(value).__name__}"
        )
    return value


def _array(meta: dict[str, Any], key: str, item: type, n: int | None) -> list | None:
    """A list metadata field of ``item`` values (length n when given), or None."""
    if key not in meta:
        return None
    value = _get(meta, key, list)
    items = (int, float) if item is float else item
    if not all(isinstance(v, items) and not isinstance(v, bool) for v in value):
        raise GGUFError(f"GGUF metadata {key}: expected a list of {item.__name__}")
    if n is not None and len(value) != n:
        raise GGUFError(f"GGUF metadata {key}: {len(value)} entries, expected {n}")
    return value


def _vocab(meta: dict[str, Any]) -> tuple[list[str], list[int]]:
    """(token texts, token types), checked as llama.cpp loads them."""
    tokens = _array(meta, "tokenizer.ggml.tokens", str, None)
    if not tokens:
        raise GGUFError("GGUF metadata has no tokenizer.ggml.tokens (or it is empty)")
    # llama.cpp renames empty tokens so that every text is unique.
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    if len(set(tokens)) != len(tokens):
        seen: set[str] = set()
        dup = next(t for t in tokens if t in seen or seen.add(t))
        raise GGUFError(f"GGUF metadata tokenizer.ggml.tokens: duplicate token {dup!r}")
    types = _array(meta, "tokenizer.ggml.token_type", int, len(tokens))
    return tokens, types if types is not None else [NORMAL] * len(tokens)


def _special_id(meta: dict[str, Any], name: str, n: int, default: int | None):
    """The id of tokenizer.ggml.<name>_token_id (llama.cpp's default if absent)."""
    key = f"tokenizer.ggml.{name}_token_id"
    if key not in meta:  # llama.cpp drops a default outside the vocabulary
        return default if default is not None and default < n else None
    i = _get(meta, key, int)
    if not 0 <= i < n:
        raise GGUFError(
            f"GGUF metadata {key} = {i}: outside the vocabulary (0..{n - 1})"
        )
    return i


# Token texts llama.cpp's load_vocab turns into control tokens whatever their GGUF
# type (llama-vocab.cpp, "auto-detect special tokens by text" and the EOG list).
EOG_TEXTS = frozenset(
    (
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>",
        "<|calls|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>",
        "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>", "<end_of_utterance>", "<eos>",
        "<turn|>", "<|tool_response>", "<\uff5cend\u2581of\u2581sentence\uff5c>",
        "[e~[",
    )
)  # fmt: skip
# FIM tokens found by text when their tokenizer.ggml.<kind>_token_id is absent.
FIM_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<PRE>",
                "\u2581<PRE>", "<|code_prefix|>", "<|prefix|>",
                "<\uff5cfim\u2581begin\uff5c>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<SUF>",
                "\u2581<SUF>", "<|code_suffix|>", "<|suffix|>",
                "<\uff5cfim\u2581hole\uff5c>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<MID>",
                "\u2581<MID>", "<|code_middle|>", "<|middle|>",
                "<\uff5cfim\u2581end\uff5c>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}  # fmt: skip
_FIM_ALIASES = {"fim_pre": "prefix", "fim_suf": "suffix", "fim_mid": "middle"}


def _fim_ids(meta: dict[str, Any], ids: dict[str, int]) -> dict[str, tuple]:
    """Per FIM kind: (id or None, found by text?), as llama.cpp resolves them."""
    out = {}
    for kind, texts in FIM_TEXTS.items():
        keys = [f"tokenizer.ggml.{kind}_token_id"]
        if kind in _FIM_ALIASES:
            keys.append(f"tokenizer.ggml.{_FIM_ALIASES[kind]}_token_id")
        given = [meta[k] for k in keys if isinstance(meta.get(k), int)]
        found = [ids[t] for t in texts if t in ids]
        out[kind] = (given[-1], False) if given else (min(found, default=None), True)
    return out


def eog_token_ids(meta: dict[str, Any]) -> list[int]:
    """Ids that end generation in llama.cpp (EOS, EOT, EOM, FIM pad/rep/sep, ...).

    Meant for ``eos_token_id`` in an mlx-lm ``config.json``.
    """
    tokens, _ = _vocab(meta)
    ids = {t: i for i, t in enumerate(tokens)}
    n = len(tokens)
    fim = _fim_ids(meta, ids)
    eog = {fim[k][0] for k in ("fim_pad", "fim_rep", "fim_sep")} - {None}
    eog |= {ids[t] for t in EOG_TEXTS if t in ids}
    default_eos = 2 if meta.get("tokenizer.ggml.model") == "llama" else 11
    eog.add(_special_id(meta, "eos", n, default_eos))
    for name in ("eot", "eom"):
        eog.add(_special_id(meta, name, n, None))
    eog.discard(None)
    texts = {tokens[i] for i in eog}
    if "<|end|>" in texts and (
        {"<|return|>", "<|call|>"} <= texts or {"<|calls|>", "<|flush|>"} <= texts
    ):
        eog.discard(ids["<|end|>"])
    if "</s>" in texts and {"<|tool_response>", "<|plamo:eos|>"} & texts:
        eog.discard(ids["</s>"])
    return sorted(eog)


def token_kinds(meta: dict[str, Any], tokens: list[str], types: list[int]) -> list:
    """Per token: "control", "user" (user-defined) or None, as llama.cpp sees them.

    llama.cpp matches control, unknown and user-defined tokens in the raw text
    before tokenizing (control and unknown only when parsing special tokens),
    after promoting end-of-generation and FIM texts to control tokens.
    """
    kinds: list = [
        "control" if t in (CONTROL, UNKNOWN) else "user" if t == USER_DEFINED else None
        for t in types
    ]
    ids = {t: i for i, t in enumerate(tokens)}
    promoted = [ids[t] for t in EOG_TEXTS if t in ids]
    promoted += [
        i for i, by_text in _fim_ids(meta, ids).values() if by_text and i is not None
    ]
    for i in promoted:
        kinds[i] = "control"
    for text in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):
        if text in ids:  # llama.cpp's gpt-oss rule: always rendered
            kinds[ids[text]] = "user"
    # Dropped from the EOG list by llama.cpp: <|end|> becomes user-defined
    # (gpt-oss, solar-open), </s> a normal token (gemma4, plamo).
    eog = set(eog_token_ids(meta))
    for text, kind in (("<|end|>", "user"), ("</s>", None)):
        if text in ids and ids[text] not in eog:
            kinds[ids[text]] = kind
    return kinds


def _added_tokens(tokens: list[str], kinds: list) -> list[dict]:
    """Control (special) and user-defined (not special) added tokens."""
    return [
        {
            "id": i,
            "content": tokens[i],
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": kind == "control",
        }
        for i, kind in enumerate(kinds)
        if kind is not None
    ]


def _post_processor(bos: str | None, eos: str | None, ids: dict) -> dict | None:
    """TemplateProcessing adding BOS and/or EOS, as llama.cpp's add_special."""
    if bos is None and eos is None:
        return None

    def seq(name: str, type_id: int) -> list[dict]:
        out = [{"SpecialToken": {"id": bos, "type_id": type_id}}] if bos else []
        out.append({"Sequence": {"id": name, "type_id": type_id}})
        if eos:
            out.append({"SpecialToken": {"id": eos, "type_id": type_id}})
        return out

    specials = {t: {"id": t, "ids": [ids[t]], "tokens": [t]} for t in (bos, eos) if t}
    return {
        "type": "TemplateProcessing",
        "single": seq("A", 0),
        "pair": seq("A", 0) + seq("B", 1),
        "special_tokens": specials,
    }


def _bpe_merges(meta: dict[str, Any], ids: dict[str, int]) -> list[list[str]]:
    """GGUF merges ("a b", split at the first space after the first character)."""
    merges = _array(meta, "tokenizer.ggml.merges", str, None)
    if merges is None:
        raise GGUFError(
            "GGUF metadata has no tokenizer.ggml.merges (needed for gpt2 BPE)"
        )
    out, seen = [], set()
    for rank, merge in enumerate(merges):
        cut = merge.find(" ", 1)
        left, right = merge[:cut], merge[cut + 1 :]
        if cut < 0 or left not in ids or right not in ids or left + right not in ids:
            raise GGUFError(
                f"GGUF metadata tokenizer.ggml.merges[{rank}] = {merge!r}: "
                "expected two tokens whose concatenation is a token"
            )
        if (left, right) not in seen:  # llama.cpp keeps the first rank
            seen.add((left, right))
            out.append([left, right])
    return out


def _bpe_tokenizer(meta: dict[str, Any], tokens: list[str]) -> tuple[dict, dict]:
    """(tokenizer.json parts, options) for a byte-level BPE (gpt2) vocabulary."""
    pre = _get(meta, "tokenizer.ggml.pre", str, "default") or "default"
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(
            f"GGUF metadata tokenizer.ggml.pre = {pre!r} is not supported; "
            f"supported: {', '.join(sorted(PRE_TOKENIZERS))}"
        )
    regexes, ignore_merges, add_bos, clean_spaces = PRE_TOKENIZERS[pre]
    ids = {t: i for i, t in enumerate(tokens)}
    splits = [
        {
            "type": "Split",
            "pattern": {"Regex": r},
            "behavior": "Isolated",
            "invert": False,
        }
        for r in regexes
    ]
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    parts = {
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [*splits, {"type": "ByteLevel", **byte_level}],
        },
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": _bpe_model(ids, _bpe_merges(meta, ids), False, False, ignore_merges),
    }
    ids_default = {"bos": 11, "eos": 11, "unknown": None, "padding": None}
    return parts, {"add_bos": add_bos, "clean_spaces": clean_spaces, **ids_default}


def _bpe_model(
    vocab: dict[str, int],
    merges: list[list[str]],
    fuse_unk: bool,
    byte_fallback: bool,
    ignore_merges: bool,
) -> dict[str, Any]:
    """tokenizer.json's ``model`` for a BPE vocabulary (byte-level or SentencePiece)."""
    return {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": fuse_unk,
        "byte_fallback": byte_fallback,
        "ignore_merges": ignore_merges,
        "vocab": vocab,
        "merges": merges,
    }


def spm_merges(tokens: list[str], scores: list[float]) -> list[list[str]]:
    """BPE merges, best first, reproducing llama.cpp's score-greedy SPM merging.

    Every split of every token into two tokens is a merge, ranked by the merged
    token's score (ties: lower merged id first, then shorter left part).
    """
    ids = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for i, token in enumerate(tokens):
        for cut in range(1, len(token)):
            left = ids.get(token[:cut])
            if left is not None:
                right = ids.get(token[cut:])
                if right is not None:
                    ranked.append((-scores[i], i, cut, left, right))
    ranked.sort()
    return [[tokens[left], tokens[right]] for *_, left, right in ranked]


def _spm_tokenizer(meta: dict[str, Any], tokens: list[str]) -> tuple[dict, dict]:
    """(tokenizer.json parts, options) for a SentencePiece (llama) vocabulary."""
    scores = _array(meta, "tokenizer.ggml.scores", float, len(tokens))
    if scores is None:
        raise GGUFError(
            "GGUF metadata has no tokenizer.ggml.scores (needed for llama SPM)"
        )
    space_prefix = _get(meta, "tokenizer.ggml.add_space_prefix", bool, True)
    ids = set(tokens)
    byte_fallback = all(f"<0x{b:02X}>" in ids for b in range(256))
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    normalizer: dict = replace
    if space_prefix:
        prepend = {"type": "Prepend", "prepend": "\u2581"}
        normalizer = {"type": "Sequence", "normalizers": [prepend, replace]}
    decoders = [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if space_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    parts = {
        "normalizer": normalizer,
        "pre_tokenizer": None,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": _bpe_model(
            {t: i for i, t in enumerate(tokens)},
            spm_merges(tokens, [float(s) for s in scores]),
            fuse_unk=True,
            byte_fallback=byte_fallback,
            ignore_merges=False,
        ),
    }
    ids_default = {"bos": 1, "eos": 2, "unknown": 0, "padding": None}
    return parts, {"add_bos": True, "clean_spaces": False, **ids_default}


def _chat_template(meta: dict[str, Any]) -> str | list[dict] | None:
    """tokenizer.chat_template, plus named tokenizer.chat_template.<name> ones."""
    default = _get(meta, "tokenizer.chat_template", str, None)
    prefix = "tokenizer.chat_template."
    named = [
        {"name": k[len(prefix) :], "template": _get(meta, k, str)}
        for k in sorted(meta)
        if k.startswith(prefix)
    ]
    if not named:
        return default
    if default is not None:
        named.insert(0, {"name": "default", "template": default})
    return named


def tokenizer_files(meta: dict[str, Any]) -> dict[str, dict]:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json contents.

    Args:
        meta: GGUF metadata as plain Python values (``read_metadata``).

    Raises:
        GGUFError: a tokenizer field is missing, malformed or unsupported.
    """
    kind = _get(meta, "tokenizer.ggml.model", str)
    tokens, types = _vocab(meta)
    if kind == "gpt2":
        parts, opts = _bpe_tokenizer(meta, tokens)
    elif kind == "llama":
        parts, opts = _spm_tokenizer(meta, tokens)
    else:
        raise GGUFError(
            f"GGUF metadata tokenizer.ggml.model = {kind!r} is not supported; "
            "supported: 'gpt2' (byte-level BPE), 'llama' (SentencePiece)"
        )
    n = len(tokens)
    special = {
        name: _special_id(meta, name, n, opts[name])
        for name in ("bos", "eos", "unknown", "padding")
    }
    add_bos = _get(meta, "tokenizer.ggml.add_bos_token", bool, opts["add_bos"])
    add_eos = _get(meta, "tokenizer.ggml.add_eos_token", bool, False)
    text = {k: (None if i is None else tokens[i]) for k, i in special.items()}
    for flag, name in ((add_bos, "bos"), (add_eos, "eos")):
        if flag and text[name] is None:
            raise GGUFError(f"GGUF metadata: add_{name}_token is set but no {name} id")
    ids = {t: i for i, t in enumerate(tokens)}
    added = _added_tokens(tokens, token_kinds(meta, tokens, types))
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": parts["normalizer"],
        "pre_tokenizer": parts["pre_tokenizer"],
        "post_processor": _post_processor(
            text["bos"] if add_bos else None, text["eos"] if add_eos else None, ids
        ),
        "decoder": parts["decoder"],
        "model": parts["model"],
    }
    names = {"bos": "bos_token", "eos": "eos_token", "unknown": "unk_token"}
    names["padding"] = "pad_token"
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{names[k]: t for k, t in text.items() if t is not None},
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": opts["clean_spaces"],
        "split_special_tokens": False,
        "added_tokens_decoder": {
            str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added
        },
    }
    arch = meta.get("general.architecture")
    context = meta.get(f"{arch}.context_length") if isinstance(arch, str) else None
    if isinstance(context, int) and not isinstance(context, bool) and context > 0:
        config["model_max_length"] = context
    template = _chat_template(meta)
    if template is not None:
        config["chat_template"] = template
    token_map = {
        names[k]: {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        }
        for k, t in text.items()
        if t is not None
    }
    return {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": config,
        "special_tokens_map.json": token_map,
    }

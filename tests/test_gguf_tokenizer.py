"""GGUF metadata -> Hugging Face tokenizer files, on small vocabularies built here.

Expected ids are worked out by hand from llama.cpp's rules (llama-vocab.cpp), and
for SentencePiece vocabularies also checked against a direct re-implementation of
llama.cpp's score-greedy SPM merge on many random strings. Every tokenizer is
loaded the way mlx-lm loads a model folder (``mlx_lm.tokenizer_utils.load``).
The real GGUF vocabularies are compared with llama.cpp itself in
``test_gguf_reference.py``.
"""

from __future__ import annotations

import json
import random

import pytest
from mlx_lm.tokenizer_utils import load

from mlx_braces.conversion.gguf import GGUFError
from mlx_braces.conversion.gguf_tokenizer import spm_merges, tokenizer_files

CONTROL, USER_DEFINED, BYTE = 3, 4, 6


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE alphabet)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


BYTE_CHARS = bytes_to_unicode()


def load_files(files: dict[str, dict], tmp_path):
    """The mlx-lm TokenizerWrapper of a folder holding ``files``."""
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content), encoding="utf-8")
    return load(tmp_path)


def encode(wrapper, text: str, parse_special: bool = True) -> list[int]:
    """Ids with special tokens added, special-token text parsed or not."""
    return wrapper._tokenizer(text, split_special_tokens=not parse_special)["input_ids"]


# ---------------------------------------------------------------- byte-level BPE

BPE_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BPE_MERGED = ["Ġt", "he", "Ġthe", "12", "123", "45", "Ġw", "ab", "abc", "xyz", "'s"]
BPE_MERGES = ["Ġ t", "h e", "Ġt he", "1 2", "12 3", "4 5", "Ġ w", "a b", "ab c", "' s"]


def bpe_meta(pre: str = "smollm", **extra) -> dict:
    """A tiny gpt2-style vocabulary: 3 control tokens, 256 bytes, a few merges."""
    tokens = BPE_SPECIAL + [BYTE_CHARS[b] for b in range(256)] + BPE_MERGED
    meta = {
        "general.architecture": "llama",
        "llama.context_length": 2048,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [CONTROL] * 3 + [1] * (len(tokens) - 3),
        "tokenizer.ggml.merges": list(BPE_MERGES),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": "{% for m in messages %}<|im_start|>"
        "{{ m['content'] }}<|im_end|>{% endfor %}",
    }
    meta.update(extra)
    return meta


def bid(text: str) -> int:
    """Id of a token of the tiny BPE vocabulary (bytes given as raw text)."""
    tokens = BPE_SPECIAL + [BYTE_CHARS[b] for b in range(256)] + BPE_MERGED
    mapped = "".join(BYTE_CHARS[b] for b in text.encode("utf-8"))
    return tokens.index(text if text in tokens else mapped)


def test_bpe_smollm_splits_digits_and_merges(tmp_path):
    tok = load_files(tokenizer_files(bpe_meta("smollm")), tmp_path)
    # smollm: every digit on its own (\p{N}), then GPT-2's regex.
    assert encode(tok, "12345") == [bid(c) for c in "12345"]
    assert encode(tok, " the w") == [bid("Ġthe"), bid("Ġw")]
    assert encode(tok, "abc") == [bid("abc")]
    assert encode(tok, "it's") == [bid("i"), bid("t"), bid("'s")]
    assert encode(tok, "é") == [3 + 0xC3, 3 + 0xA9]  # two byte tokens, no merge


def test_bpe_pre_tokenizers_follow_llama_cpp(tmp_path):
    ids = {}
    for pre in ("smollm", "gpt-2", "default", "llama-bpe", "qwen2"):
        (tmp_path / pre).mkdir()
        tok = load_files(tokenizer_files(bpe_meta(pre)), tmp_path / pre)
        ids[pre] = (encode(tok, "12345"), encode(tok, "xyz"))
    singles = [bid(c) for c in "12345"]
    groups = [bid("123"), bid("45")]
    letters = [bid(c) for c in "xyz"]
    # llama3 regex groups digits by 3 and, with ignore_merges, takes a whole word
    # that is in the vocabulary even without a merge path to it.
    assert ids["llama-bpe"] == (groups, [bid("xyz")])
    assert ids["gpt-2"] == (groups, letters)
    assert ids["default"] == (groups, letters)
    assert ids["qwen2"] == (singles, letters)
    assert ids["smollm"] == (singles, letters)


def test_bpe_special_tokens_and_bos(tmp_path):
    files = tokenizer_files(
        bpe_meta("smollm", **{"tokenizer.ggml.add_bos_token": True})
    )
    tok = load_files(files, tmp_path)
    text = "<|im_start|>the<|im_end|>"
    assert encode(tok, text) == [1, 1, bid("t"), bid("he"), 2]
    chars = [bid(c) for c in "<|im_start|>"], [bid(c) for c in "<|im_end|>"]
    assert encode(tok, text, parse_special=False) == [1, *chars[0]] + [
        bid("t"),
        bid("he"),
        *chars[1],
    ]
    assert tok.decode(encode(tok, " the 12 é")[1:]) == " the 12 é"
    config = files["tokenizer_config.json"]
    assert config["bos_token"] == "<|im_start|>" and config["eos_token"] == "<|im_end|>"
    assert config["pad_token"] == "<|im_end|>" and config["model_max_length"] == 2048
    assert config["add_bos_token"] is True
    assert files["special_tokens_map.json"]["eos_token"]["content"] == "<|im_end|>"
    assert (
        tok.apply_chat_template([{"role": "user", "content": "the"}], tokenize=False)
        == "<|im_start|>the<|im_end|>"
    )


# ---------------------------------------------------------------- SentencePiece

SPM_PIECES = [  # (text, score): "bc" outranks "ab", "▁a" outranks both
    ("\u2581", -100.0),
    ("a", -101.0),
    ("b", -102.0),
    ("c", -103.0),
    ("d", -104.0),
    ("ab", -3.0),
    ("bc", -2.0),
    ("abc", -4.0),
    ("\u2581a", -1.0),
    ("\u2581ab", -5.0),
]
SPM_USER = ["\n", "  "]  # user-defined, matched in the raw text (as Gemma's)


def spm_meta(space_prefix: bool = False, **extra) -> dict:
    """A tiny llama (SentencePiece) vocabulary with byte fallback."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, CONTROL, CONTROL] + [BYTE] * 256
    scores = [0.0] * len(tokens)
    for text, score in SPM_PIECES:
        tokens.append(text)
        types.append(1)
        scores.append(score)
    for text in SPM_USER:
        tokens.append(text)
        types.append(USER_DEFINED)
        scores.append(-1000.0)
    meta = {
        "general.architecture": "gemma3",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_space_prefix": space_prefix,
    }
    meta.update(extra)
    return meta


def sid(text: str) -> int:
    """Id of a token of the tiny SPM vocabulary."""
    return spm_meta()["tokenizer.ggml.tokens"].index(text)


def llama_cpp_spm(meta: dict, text: str, parse_special: bool = True) -> list[int]:
    """llama.cpp's SPM tokenize (llama-vocab.cpp), transcribed for the test.

    Special tokens are cut out of the raw text longest first; each remaining
    fragment gets a leading space if add_space_prefix, spaces become "▁", and
    adjacent symbols merge while their concatenation is a token, highest score
    first (leftmost on ties); symbols that are not tokens become byte tokens.
    """
    tokens = meta["tokenizer.ggml.tokens"]
    types, scores = meta["tokenizer.ggml.token_type"], meta["tokenizer.ggml.scores"]
    ids = {t: i for i, t in enumerate(tokens)}
    kinds = (CONTROL, 2) if parse_special else ()
    special = sorted(
        (i for i, t in enumerate(types) if t in (*kinds, USER_DEFINED)),
        key=lambda i: -len(tokens[i]),
    )
    fragments: list = [text] if text else []
    for i in special:
        out = []
        for frag in fragments:
            if isinstance(frag, int):
                out.append(frag)
                continue
            parts = frag.split(tokens[i])
            for k, part in enumerate(parts):
                if k:
                    out.append(i)
                if part:
                    out.append(part)
        fragments = out
    result = [meta["tokenizer.ggml.bos_token_id"]]
    for frag in fragments:
        if isinstance(frag, int):
            result.append(frag)
            continue
        if meta["tokenizer.ggml.add_space_prefix"]:
            frag = " " + frag
        symbols = list(frag.replace(" ", "\u2581"))
        while True:
            best = None
            for k in range(len(symbols) - 1):
                joined = symbols[k] + symbols[k + 1]
                if joined in ids and (best is None or scores[ids[joined]] > best[0]):
                    best = (scores[ids[joined]], k)
            if best is None:
                break
            k = best[1]
            symbols[k : k + 2] = [symbols[k] + symbols[k + 1]]
        for sym in symbols:
            if sym in ids:
                result.append(ids[sym])
            else:
                result += [ids[f"<0x{b:02X}>"] for b in sym.encode("utf-8")]
    return result


def test_spm_merges_by_score(tmp_path):
    tok = load_files(tokenizer_files(spm_meta()), tmp_path)
    assert encode(tok, "abc") == [1, sid("abc")]  # bc first, then a+bc
    assert encode(tok, "abd") == [1, sid("ab"), sid("d")]
    assert encode(tok, " abc") == [1, sid("\u2581a"), sid("bc")]  # not ▁ab + c
    assert encode(tok, "é") == [1, 3 + 0xC3, 3 + 0xA9]  # byte fallback
    assert encode(tok, "a\nb") == [1, sid("a"), sid("\n"), sid("b")]
    assert encode(tok, "a   b") == [1, sid("a"), sid("  "), sid("\u2581"), sid("b")]
    assert encode(tok, "<s>ab") == [1, 1, sid("ab")]
    assert encode(tok, "<s>ab", parse_special=False) == [1, 63, 118, 65, sid("ab")]
    assert tok.decode(encode(tok, "ab c\né")[1:]) == "ab c\né"


def test_spm_space_prefix(tmp_path):
    tok = load_files(tokenizer_files(spm_meta(space_prefix=True)), tmp_path)
    assert encode(tok, "abc") == [1, sid("\u2581a"), sid("bc")]
    # llama.cpp prefixes every text fragment that follows a special token.
    assert encode(tok, "a\nb") == [
        1,
        sid("\u2581a"),
        sid("\n"),
        sid("\u2581"),
        sid("b"),
    ]
    assert encode(tok, "<s>ab") == [1, 1, sid("\u2581ab")]
    assert tok.decode(encode(tok, "abc d")[1:]) == "abc d"


def test_spm_matches_llama_cpp_algorithm_on_random_text(tmp_path):
    rng = random.Random(0)
    alphabet = "abcd"
    pieces = {c: -100.0 - k for k, c in enumerate(alphabet + "\u2581")}
    scores = rng.sample(range(1, 10_000), 200)
    while len(pieces) < 120:  # random multi-character pieces, unique scores
        n = rng.randint(2, 5)
        piece = "".join(rng.choice(alphabet + "\u2581") for _ in range(n))
        pieces.setdefault(piece, -float(scores[len(pieces)]))
    for space_prefix in (False, True):
        meta = spm_meta(space_prefix)
        meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"][:259]
        meta["tokenizer.ggml.scores"] = meta["tokenizer.ggml.scores"][:259]
        meta["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"][:259]
        for text, score in [*pieces.items(), ("\n", -1000.0), ("  ", -1000.0)]:
            meta["tokenizer.ggml.tokens"].append(text)
            meta["tokenizer.ggml.scores"].append(score)
            kind = USER_DEFINED if text in SPM_USER else 1
            meta["tokenizer.ggml.token_type"].append(kind)
        folder = tmp_path / str(space_prefix)
        folder.mkdir()
        tok = load_files(tokenizer_files(meta), folder)
        for _ in range(300):
            text = "".join(
                rng.choice(["a", "b", "c", "d", " ", "  ", "\n", "é", "<s>"])
                for _ in range(rng.randint(0, 25))
            )
            for parse_special in (True, False):
                assert encode(tok, text, parse_special) == llama_cpp_spm(
                    meta, text, parse_special
                ), (text, parse_special)


def test_spm_merges_rank_every_split_by_score():
    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    scores = [0.0, 0.0, 0.0, -3.0, -2.0, -4.0]
    assert spm_merges(tokens, scores) == [
        ["b", "c"],  # bc (-2)
        ["a", "b"],  # ab (-3)
        ["a", "bc"],  # abc (-4), both splits
        ["ab", "c"],
    ]


# ---------------------------------------------------------------- metadata errors


@pytest.mark.parametrize(
    "change, match",
    [
        ({"tokenizer.ggml.model": None}, "no tokenizer.ggml.model"),
        ({"tokenizer.ggml.model": "t5"}, "'t5' is not supported"),
        ({"tokenizer.ggml.pre": "mystery"}, "'mystery' is not supported; supported:"),
        ({"tokenizer.ggml.merges": None}, "no tokenizer.ggml.merges"),
        ({"tokenizer.ggml.merges": ["Ġ q"]}, r"merges\[0\] = 'Ġ q'"),
        ({"tokenizer.ggml.tokens": None}, "no tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.tokens": ["a", "b", "a"]}, "duplicate token 'a'"),
        ({"tokenizer.ggml.token_type": [1, 1]}, "token_type: 2 entries, expected"),
        ({"tokenizer.ggml.bos_token_id": 10**6}, "bos_token_id = 1000000: outside"),
        ({"tokenizer.ggml.eos_token_id": "2"}, "eos_token_id: expected int, got str"),
        ({"tokenizer.ggml.add_bos_token": 1}, "add_bos_token: expected bool"),
    ],
)
def test_bpe_metadata_errors(change, match):
    meta = bpe_meta()
    for key, value in change.items():
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    with pytest.raises(GGUFError, match=match) as e:
        tokenizer_files(meta)
    assert "\n" not in str(e.value)


def test_spm_metadata_errors():
    meta = spm_meta()
    del meta["tokenizer.ggml.scores"]
    with pytest.raises(GGUFError, match="no tokenizer.ggml.scores"):
        tokenizer_files(meta)
    meta = spm_meta()
    meta["tokenizer.ggml.scores"] = ["x"] * len(meta["tokenizer.ggml.tokens"])
    with pytest.raises(GGUFError, match="scores: expected a list of float"):
        tokenizer_files(meta)
    meta = spm_meta()
    meta["tokenizer.ggml.tokens"][3] = "\u2581"  # now a duplicate
    with pytest.raises(GGUFError, match="duplicate token '\u2581'"):
        tokenizer_files(meta)


def test_end_of_generation_texts_become_control_tokens(tmp_path):
    from mlx_braces.conversion.gguf_tokenizer import eog_token_ids

    meta = bpe_meta()
    meta["tokenizer.ggml.token_type"][0] = 1  # <|endoftext|> typed as normal
    # llama.cpp ends generation on EOS and on known texts such as <|endoftext|>,
    # and makes those control tokens whatever their GGUF type.
    assert eog_token_ids(meta) == [0, 2]
    files = tokenizer_files(meta)
    added = {
        a["content"]: a["special"] for a in files["tokenizer.json"]["added_tokens"]
    }
    assert added == dict.fromkeys(BPE_SPECIAL, True)
    tok = load_files(files, tmp_path)
    assert encode(tok, "a<|endoftext|>") == [bid("a"), 0]

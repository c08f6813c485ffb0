"""Record llama.cpp's tokenization, greedy text and logits for the real GGUF models.

llama.cpp (through ``llama-cpp-python``) is the independent reference that
``tests/test_gguf_reference.py`` holds the GGUF import to. For each model this
writes ``tests/data/gguf_reference/<name>.json`` with:

* ``tokenize``: ids of tricky strings (Unicode, digits, whitespace runs, code,
  special-token text), with the model's own BOS rule (``add_special``) and with
  special-token text parsed (``parse_special=true``) or kept as text (``false``),
  and those ids detokenized again (special tokens rendered);
* ``chat``: the GGUF's chat template rendered with jinja2 (as transformers
  does), and its ids with special tokens parsed;
* ``greedy``: 64 greedy tokens after each of a few prompts, their text
  (special tokens dropped), and llama.cpp's top-1 minus top-2 logit margin at
  every step (to recognise near-ties);
* ``logits``: last-position logits of a few prompts, kept small: the top 50
  (ids and values), a fixed random subset of 200 vocabulary ids and the
  full-vocabulary logsumexp;
* ``greedy_f32``, ``logits_f32``: the same on an F32 copy of the GGUF (every
  tensor dequantized with the ``gguf`` package), where llama.cpp does not
  quantize activations: the same weights without that noise;
* ``pre_tokenizers`` (SmolLM2 only): the tricky strings tokenized with the
  SmolLM2 vocabulary under every ``tokenizer.ggml.pre`` name mlx_braces
  supports (vocabulary-only GGUF copies written with the ``gguf`` package).

Run it with a venv holding llama-cpp-python, jinja2, numpy and gguf (it does not
import mlx_braces)::

    /work/llamaenv/bin/python scripts/make_gguf_reference.py \
        --smollm2 /work/dl/SmolLM2-135M-Instruct.Q4_1.gguf \
        --gemma /work/dl/gemma-3-270m-q4_k_m.gguf
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import jinja2.sandbox
import llama_cpp
import numpy as np

TESTS = Path(__file__).resolve().parent.parent / "tests"
OUT_DIR = TESTS / "data" / "gguf_reference"
N_THREADS = 2
N_CTX = 512
GREEDY_STEPS = 64
TOP_K = 50
N_SAMPLE = 200
SAMPLE_SEED = 0

TRICKY = [
    "",
    " ",
    "\n",
    "Hello world",
    " Hello world",
    "  two leading spaces",
    "   three leading spaces",
    "trailing spaces   ",
    "multiple     spaces between   words",
    "Hello\tworld\n\nnew paragraph\r\nwindows line\n",
    "\n\n\n\t\t\tindented\n    four spaces",
    "1234567890",
    "3.14159 and 2,718,281,828 and 1e10 = 10000000000.",
    "The year 2024 had 366 days; 007 is 7.",
    "Café naïve résumé façade jalapeño Ünïcödé ÀÉÎÕÜ",
    "日本語のテキストと中文混合、한국어 텍스트。",
    "Здравствуй, мир! Γειά σου κόσμε. مرحبا بالعالم",
    "emoji 😀🎉👍🏽 👨‍👩‍👧‍👦 family 🤗",
    "math ∑∫√∞ ≠ ≤ ≥ ± × ÷ → ⇒",
    "zero\u200bwidth, combining e\u0301, nbsp\u00a0here",
    "rare 𓀀 𝔘𝔫𝔦 \ue000 \U0001f9ff \x01\x7f",
    "I'm you're they've she'll he'd it's don't I'M YOU'RE IT'S",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa !!!!!!!! ........ ----",
    "def foo(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    '<div class="a">&amp;</div> <b>bold</b> <s>x</s>',
    "URL https://example.com/path?q=1&r=2#frag email a.b@c.de",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>text",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<bos>hello<eos> <unused5> <pad>",
    "x<|im_start|><|im_start|>y",
]

# Strings where llama.cpp's pre-tokenizer regexes differ from one another.
PRE_EXTRA = [
    "I'M HE'LL 'S 'Ll it's",
    "a\r\n\r\nb  \n  c",
    "x\u3000y\u2003z",
    "1234567 12 1,234.5",
    "...!?;:<=>^~|$+ (a) [b] {c}",
    "\u00a0\u00a0a",
    "tab\t\tend\t",
    "\n\n\n\nx",
]
# Every tokenizer.ggml.pre that mlx_braces.conversion.gguf_tokenizer supports.
PRE_NAMES = (
    "default llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 dbrx "
    "smaug-bpe gpt-2 phi-2 mpt olmo gigachat a.x-4.0 mellum exaone4 trillion "
    "granite-docling qwen2 deepseek-r1-qwen kormo f2llmv2 hunyuan solar-open stablelm2 "
    "megrez starcoder refact codeshell exaone minerva-7b mellum2 smollm command-r"
).split()

CHAT = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy? Answer in one word."},
]

MODELS = {
    "smollm2": {
        "greedy": [
            {"chat": [{"role": "user", "content": "What is the capital of France?"}]},
            {"text": "Once upon a time"},
            {"text": "def fibonacci(n):"},
        ],
        "logits": [
            {"text": "The capital of France is"},
            {"text": "Once upon a time"},
            {"text": "def fibonacci(n):\n    "},
            {"chat": [{"role": "user", "content": "Name three colours."}]},
        ],
    },
    "gemma": {
        "greedy": [
            {"text": "The capital of France is"},
            {"text": "Once upon a time"},
            {
                "text": "<start_of_turn>user\nWrite a haiku about the sea.<end_of_turn>\n"
                "<start_of_turn>model\n"
            },
        ],
        "logits": [
            {"text": "The capital of France is"},
            {"text": "Once upon a time"},
            {"text": "def fibonacci(n):\n    "},
            {"text": "<start_of_turn>user\nName three colours.<end_of_turn>\n"},
        ],
    },
}


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def render_chat(template: str, messages: list[dict], bos: str, eos: str) -> str:
    """The chat template rendered as transformers' ``apply_chat_template`` does."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True
    )
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos
    )


def last_logits(llm: llama_cpp.Llama) -> np.ndarray:
    """(n_vocab,) float32 logits of the last evaluated position."""
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    n_vocab = llm.n_vocab()
    return np.ctypeslib.as_array(
        ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,)
    ).copy()


def prompt_ids(llm: llama_cpp.Llama, spec: dict, template: str | None) -> tuple:
    """(prompt text, ids) for a {"text"} or {"chat"} prompt, special tokens parsed."""
    if "chat" in spec:
        bos = llm.detokenize([llm.token_bos()], special=True).decode()
        eos = llm.detokenize([llm.token_eos()], special=True).decode()
        text = render_chat(template, spec["chat"], bos, eos)
    else:
        text = spec["text"]
    return text, llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)


def record(path: Path) -> dict:
    """Everything the reference tests compare against, for one GGUF file."""
    vocab = llama_cpp.Llama(
        model_path=str(path), vocab_only=True, verbose=False, n_threads=N_THREADS
    )
    template = vocab.metadata.get("tokenizer.chat_template")
    out: dict = {
        "gguf": path.name,
        "sha256": sha256(path),
        "llama_cpp_python": llama_cpp.__version__,
        "n_vocab": vocab.n_vocab(),
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab._model.vocab)),
        "tokenize": [],
    }
    for text in TRICKY:
        for parse_special in (False, True):
            ids = vocab.tokenize(
                text.encode("utf-8"), add_bos=True, special=parse_special
            )
            decoded = vocab.detokenize(ids, special=True).decode("utf-8", "replace")
            out["tokenize"].append(
                {
                    "text": text,
                    "parse_special": parse_special,
                    "ids": ids,
                    "decoded": decoded,
                }
            )
    if template is not None:
        text, ids = prompt_ids(vocab, {"chat": CHAT}, template)
        out["chat"] = {"messages": CHAT, "text": text, "ids": ids}
    del vocab

    name = "smollm2" if "smollm2" in path.name.lower() else "gemma"
    out["greedy"], out["logits"] = run_model(path, name, template, out["n_vocab"])
    with tempfile.TemporaryDirectory() as work:
        f32 = Path(work) / "f32.gguf"
        write_f32_copy(path, f32)
        out["greedy_f32"], out["logits_f32"] = run_model(
            f32, name, template, out["n_vocab"]
        )
    return out


def run_model(path: Path, name: str, template: str | None, n_vocab: int) -> tuple:
    """(greedy records, logits records) of MODELS[name]'s prompts on one GGUF."""
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=N_CTX,
        n_batch=N_CTX,
        n_threads=N_THREADS,
        n_threads_batch=N_THREADS,
        logits_all=False,
        verbose=False,
    )
    greedy = []
    for spec in MODELS[name]["greedy"]:
        text, ids = prompt_ids(llm, spec, template)
        llm.reset()
        llm.eval(ids)
        tokens, margins = [], []
        for _ in range(GREEDY_STEPS):
            logits = last_logits(llm)
            best = int(np.argmax(logits))
            tokens.append(best)
            margins.append(
                round(float(logits[best] - np.delete(logits, best).max()), 5)
            )
            llm.eval([best])
        greedy.append(
            {
                "prompt": text,
                "prompt_ids": ids,
                "ids": tokens,
                "text": llm.detokenize(tokens).decode("utf-8", "replace"),
                "margins": margins,
            }
        )
    rng = np.random.default_rng(SAMPLE_SEED)
    sample = np.sort(rng.choice(n_vocab, N_SAMPLE, replace=False))
    records = []
    for spec in MODELS[name]["logits"]:
        text, ids = prompt_ids(llm, spec, template)
        llm.reset()
        llm.eval(ids)
        logits = last_logits(llm).astype(np.float64)
        top = np.argsort(-logits, kind="stable")[:TOP_K]
        m = logits.max()
        records.append(
            {
                "prompt": text,
                "prompt_ids": ids,
                "top_ids": top.tolist(),
                "top_values": [round(float(v), 5) for v in logits[top]],
                "sample_ids": sample.tolist(),
                "sample_values": [round(float(v), 5) for v in logits[sample]],
                "logsumexp": round(float(m + np.log(np.exp(logits - m).sum())), 6),
            }
        )
    return greedy, records


def write_f32_copy(src: Path, dst: Path) -> None:
    """The GGUF with every tensor dequantized to F32 (same weights, same metadata).

    llama.cpp multiplies F32 weights by F32 activations, so this copy's logits
    are free of the 8-bit activation quantization of its quantized matmuls.
    """
    import gguf

    sys.path.insert(0, str(TESTS))
    from gguf_copy import copy_gguf  # gguf and numpy only

    def f32(t, shape):
        weights = gguf.quants.dequantize(t.data, t.tensor_type)
        return np.asarray(weights, np.float32).reshape(shape), None

    copy_gguf(src, dst, f32, file_type=gguf.LlamaFileType.ALL_F32)


def record_pre_tokenizers(path: Path, work: Path) -> dict:
    """Ids of TRICKY + PRE_EXTRA under every PRE_NAMES, on this GGUF's BPE vocabulary.

    Each name gets a vocabulary-only GGUF (the same tokens, types and merges, no
    add_bos_token, so llama.cpp's per-name default applies) and llama.cpp
    tokenizes with special tokens parsed.
    """
    import gguf

    fields = gguf.GGUFReader(path).fields
    meta = {k: f.contents() for k, f in fields.items() if k.startswith("tokenizer.")}
    texts = TRICKY + PRE_EXTRA
    out: dict = {"texts": texts, "ids": {}}
    for pre in PRE_NAMES:
        target = work / f"vocab-{pre}.gguf"
        w = gguf.GGUFWriter(str(target), "llama")
        w.add_block_count(1)
        w.add_context_length(N_CTX)
        w.add_embedding_length(64)
        w.add_feed_forward_length(128)
        w.add_head_count(1)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(meta["tokenizer.ggml.tokens"])
        w.add_token_types(meta["tokenizer.ggml.token_type"])
        w.add_token_merges(meta["tokenizer.ggml.merges"])
        w.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
        w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        vocab = llama_cpp.Llama(model_path=str(target), vocab_only=True, verbose=False)
        out["ids"][pre] = [
            vocab.tokenize(t.encode("utf-8"), add_bos=True, special=True) for t in texts
        ]
        del vocab
        target.unlink()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2", type=Path, help="SmolLM2-135M-Instruct GGUF")
    parser.add_argument("--gemma", type=Path, help="Gemma-3-270M GGUF")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    if not (args.smollm2 or args.gemma):
        parser.error("give --smollm2 and/or --gemma")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, path in (("smollm2", args.smollm2), ("gemma", args.gemma)):
        if path is None:
            continue
        if not path.is_file():
            print(f"{path}: no such file", file=sys.stderr)
            return 1
        data = record(path)
        if name == "smollm2":
            with tempfile.TemporaryDirectory() as work:
                data["pre_tokenizers"] = record_pre_tokenizers(path, Path(work))
        target = args.out_dir / f"{name}.json"
        tmp = target.with_suffix(".json.tmp")
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        tmp.write_text(text + "\n", "utf-8")
        os.replace(tmp, target)
        print(f"{target}: {target.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""mlx_braces.evaluate: scores, answers and data errors, against independent computations.

Log-likelihoods are checked against the unpatched mlx-lm model run one sequence at a
time (no padding, no batching); generation against ``mlx_lm.generate``; perplexity
against a per-document cross-entropy. The real stories260K model and tokenizer and
small LLM-Adapters excerpts (``tests/data/llm_adapters``) are used; nothing is
downloaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm import load
from mlx_lm.generate import generate

from mlx_braces import apply_braces, save_adapter
from mlx_braces.evaluate import (
    ALPACA_PROMPT,
    TASKS,
    EvalError,
    encode_pair,
    evaluate_task,
    extract_answer,
    load_task,
    loglikelihoods,
    main,
    option_texts,
    perplexity,
    windows,
)
from mlx_braces.models import EMBEDDED_MODEL as MODEL

DATA = Path(__file__).resolve().parent / "data" / "llm_adapters"


@pytest.fixture(scope="module")
def stories():
    return load(str(MODEL))


def reference_loglikelihood(model, ids: list[int], n_cont: int) -> float:
    """log p(last ``n_cont`` tokens | the rest): one unpadded forward, log_softmax."""
    logp = nn.log_softmax(model(mx.array(ids)[None])[0].astype(mx.float32), axis=-1)
    return sum(logp[t - 1, ids[t]].item() for t in range(len(ids) - n_cont, len(ids)))


def reference_split(tokenizer, context: str, continuation: str) -> tuple[list, int]:
    """The joined text's tokens and how many of them the continuation adds."""
    full = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    assert full[: len(ctx)] == ctx  # true for these texts
    return full, len(full) - len(ctx)


PAIRS = [
    ("Once upon a time, there was a little girl named", " Lily."),
    ("The cat sat on the", " mat and looked at the big red ball."),
    ("Tom was", " happy"),
    ("Once upon a time, there was a little girl named", " Bob."),
    ("She said", ' "Thank you, mom!"'),
]


def test_loglikelihoods_match_unbatched_unpadded_model(stories):
    model, tokenizer = stories
    want = [
        reference_loglikelihood(model, *reference_split(tokenizer, c, o))
        for c, o in PAIRS
    ]
    pairs = [encode_pair(tokenizer, c, o) for c, o in PAIRS]
    for batch_size in (1, 2, 5):  # padding and order differ per batch size
        got = loglikelihoods(model, pairs, batch_size=batch_size)
        assert got == pytest.approx(want, abs=2e-4)
    assert want[0] > want[3]  # the model knows Lily: a check that scores differ


def test_loglikelihoods_of_a_braced_model_match_unbatched(stories):
    model, tokenizer = load(str(MODEL))
    apply_braces(model, rank=4, gate_init=1.0, seed=0)
    model.eval()
    pairs = [encode_pair(tokenizer, c, o) for c, o in PAIRS]
    want = [
        reference_loglikelihood(model, *reference_split(tokenizer, c, o))
        for c, o in PAIRS
    ]
    assert loglikelihoods(model, pairs, batch_size=3) == pytest.approx(want, abs=2e-4)
    base = loglikelihoods(stories[0], pairs, batch_size=3)
    assert max(abs(a - b) for a, b in zip(want, base)) > 1e-2  # the brace acts


def test_encode_pair_moves_context_space_to_continuation(stories):
    _, tokenizer = stories
    ctx, cont = encode_pair(tokenizer, "Tom was ", "happy")
    assert ctx + cont == tokenizer.encode("Tom was happy")
    assert (ctx, cont) == encode_pair(tokenizer, "Tom was", " happy")
    with pytest.raises(EvalError, match="no tokens"):
        encode_pair(tokenizer, "Tom was", "")


def write_task(tmp_path: Path, name: str, items: list) -> Path:
    path = tmp_path / name / "test.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(items))
    return path


def boolq_item(question: str, answer: str) -> dict:
    return {
        "instruction": "Please answer the following question with true or false, "
        f"question: {question}?\n\nAnswer format: true/false",
        "input": "",
        "output": f"the correct answer is {answer}",
        "answer": answer,
    }


def test_mc_accuracy_on_items_built_from_the_models_preference(stories, tmp_path):
    model, tokenizer = stories
    questions = ["is the sky blue", "can a cat fly", "do birds sing"]
    prefer = []
    for q in questions:
        prompt = (
            "Below is an instruction that describes a task. Write a response that "
            "appropriately completes the request.\n\n### Instruction:\nPlease answer "
            f"the following question with true or false, question: {q}?\n\nAnswer "
            "format: true/false\n\n### Response:\nthe correct answer is"
        )
        ll = {
            a: reference_loglikelihood(
                model, *reference_split(tokenizer, prompt, " " + a)
            )
            for a in ("true", "false")
        }
        prefer.append(max(ll, key=ll.get))
    other = {"true": "false", "false": "true"}
    answers = [prefer[0], prefer[1], other[prefer[2]]]
    path = write_task(
        tmp_path, "boolq", [boolq_item(q, a) for q, a in zip(questions, answers)]
    )
    r = evaluate_task(model, tokenizer, load_task(path), "mc", batch_size=4)
    assert r["n"] == 3
    assert r["acc"] == pytest.approx(2 / 3)
    assert [s["prediction"] for s in r["samples"]] == prefer
    assert [s["correct"] for s in r["samples"]] == [True, True, False]


def test_mc_text_target_scores_the_option_text(stories, tmp_path):
    model, tokenizer = stories
    item = json.loads((DATA / "winogrande" / "test.json").read_text())[0]
    task = load_task(write_task(tmp_path, "winogrande", [item]))
    r = evaluate_task(model, tokenizer, task, "mc", mc_target="text")
    prompt = ALPACA_PROMPT.format(instruction=item["instruction"])
    want = [
        reference_loglikelihood(
            model,
            *reference_split(tokenizer, prompt + "the correct answer is", " " + t),
        )
        for t in ("Sarah", "Maria")
    ]
    assert r["samples"][0]["loglikelihoods"] == pytest.approx(want, abs=2e-4)


def test_gen_mode_extracts_from_mlx_lm_greedy_output(stories, tmp_path):
    model, tokenizer = stories
    items = json.loads((DATA / "piqa" / "test.json").read_text())[:2]
    task = load_task(write_task(tmp_path, "piqa", items))
    r = evaluate_task(model, tokenizer, task, "gen", max_tokens=12, batch_size=2)
    for item, sample in zip(items, r["samples"]):
        prompt = ALPACA_PROMPT.format(instruction=item["instruction"])
        want = generate(model, tokenizer, prompt, max_tokens=12)
        assert sample["output"] == want
        assert sample["prediction"] == extract_answer(want, TASKS["piqa"])
    assert r["acc"] == sum(s["correct"] for s in r["samples"]) / 2


@pytest.mark.parametrize(
    "text, vocabulary, want",
    [
        ("the correct answer is solution2", TASKS["piqa"], "solution2"),
        ("The answer is Solution2.", TASKS["piqa"], "solution2"),
        ("solution1 or solution2? solution2", TASKS["piqa"], "solution1"),
        ("true.", TASKS["boolq"], "true"),
        ("False", TASKS["boolq"], "false"),
        ("TRUE!", TASKS["boolq"], "true"),
        ("that is untrue, so false", TASKS["boolq"], "false"),
        ("answer10 is not an option", ("answer1", "answer10"), "answer10"),
        ("answer10 then answer1", TASKS["ARC-Easy"], "answer1"),
        ("answer3's text", TASKS["ARC-Easy"], "answer3"),
        ("option2\n", TASKS["winogrande"], "option2"),
        ("no answer here", TASKS["boolq"], None),
        ("", TASKS["piqa"], None),
    ],
)
def test_extract_answer(text, vocabulary, want):
    assert extract_answer(text, vocabulary) == want


def test_option_texts_of_real_instructions():
    def first(task):
        return json.loads((DATA / task / "test.json").read_text())[0]["instruction"]

    assert option_texts(first("winogrande"), ["option1", "option2"]) == [
        "Sarah",
        "Maria",
    ]
    piqa = option_texts(first("piqa"), ["solution1", "solution2"])
    assert piqa[0].startswith("Provide the guinea pig") and piqa[0].endswith("dish.")
    assert "ripped jeans" in piqa[1] and "Answer format" not in piqa[1]
    arc = option_texts(first("ARC-Challenge"), [f"answer{i}" for i in range(1, 5)])
    assert arc == [
        "Planetary density will decrease.",
        "Planetary years will become longer.",
        "Planetary days will become shorter.",
        "Planetary gravity will become stronger.",
    ]
    assert option_texts(first("boolq"), ["true", "false"]) == ["true", "false"]


def test_load_task_reads_every_llm_adapters_excerpt():
    for task in ("boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy"):
        t = load_task(DATA / task / "test.json")
        assert t.name == task and len(t.items) == 4
        for item, opts in zip(t.items, t.options):
            assert item["answer"] in opts
    assert load_task(DATA / "social_i_qa" / "test.json").options[0] == [
        "answer1",
        "answer2",
        "answer3",
    ]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "file not found"),
        ("[{", "not valid JSON"),
        ('{"instruction": "x"}', "expected a non-empty JSON list"),
        ("[]", "expected a non-empty JSON list"),
        (
            '[{"instruction": "a?\\nAnswer format: true/false", "answer": "true"}, 3]',
            "item 1 is not a JSON object",
        ),
        ('[{"answer": "true"}]', "item 0 has no 'instruction' string"),
        (
            '[{"instruction": "a?\\nAnswer format: true/false"}]',
            "item 0 has no 'answer' string",
        ),
        (
            '[{"instruction": "a?\\nAnswer format: true/false", "answer": "maybe"}]',
            r"item 0: answer 'maybe' is not one of its options true/false",
        ),
    ],
)
def test_layout_errors_name_file_and_item(tmp_path, content, message):
    path = tmp_path / "boolq" / "test.json"
    if content is not None:
        path.parent.mkdir()
        path.write_text(content)
    with pytest.raises(EvalError, match=message) as e:
        load_task(path)
    assert str(path) in str(e.value)


def test_unknown_task_without_vocabulary_lists_known_tasks(tmp_path):
    path = write_task(tmp_path, "mytask", [{"instruction": "2+2?", "answer": "4"}])
    with pytest.raises(EvalError, match="known tasks: boolq, piqa"):
        load_task(path)
    fmt = {"instruction": "2+2?\n\nAnswer format: three/four", "answer": "four"}
    task = load_task(write_task(tmp_path, "mytask", [fmt]))
    assert task.vocabulary == ("three", "four")


def test_windows_predict_every_token_once_with_longest_context():
    tokens = list(range(100, 123))  # 23 tokens
    for start, length in [(1, 5), (4, 5), (1, 30), (7, 3)]:
        ws = windows(tokens, start, length)
        predicted = [t for _, cont in ws for t in cont]
        assert predicted == tokens[start:]
        for ctx, cont in ws:
            assert len(ctx) + len(cont) - 1 <= length  # model inputs per window
            assert (
                ctx + cont == tokens[tokens.index(ctx[0]) : tokens.index(cont[-1]) + 1]
            )
            assert len(ctx) >= 1


def test_perplexity_matches_per_document_cross_entropy(stories, tmp_path):
    model, tokenizer = stories
    texts = ["Once upon a time, there was a dog.", "Lily saw a big red ball."]
    path = tmp_path / "ppl.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    nll, n = 0.0, 0
    for t in texts:
        ids = tokenizer.encode(t) + [tokenizer.eos_token_id]  # as mlx-lm trains
        logits = model(mx.array(ids[:-1])[None])[0].astype(mx.float32)
        ce = nn.losses.cross_entropy(logits, mx.array(ids[1:]), reduction="sum")
        nll, n = nll + ce.item(), n + len(ids) - 1
    r = perplexity(model, tokenizer, path, batch_size=2)
    assert r["tokens"] == n and r["documents"] == 2
    assert r["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    windowed = perplexity(model, tokenizer, path, max_seq_length=4)
    assert windowed["tokens"] == n and windowed["perplexity"] > r["perplexity"]


def test_cli_with_a_braces_adapter_writes_json(stories, tmp_path, capsys):
    model, tokenizer = load(str(MODEL))
    apply_braces(model, rank=4, gate_init=2.0, seed=1)
    adapter = save_adapter(model, tmp_path / "adapter", model=str(MODEL))
    model.eval()
    out = tmp_path / "r.json"
    main(
        [
            "--adapter-path",
            str(adapter),
            "--tasks",
            "boolq,winogrande",
            "--data-dir",
            str(DATA),
            "--limit",
            "2",
            "--output",
            str(out),
            "--log-samples",
        ]
    )
    r = json.loads(out.read_text())
    assert list(r["tasks"]) == ["boolq", "winogrande"]
    for name in ("boolq", "winogrande"):
        task = load_task(DATA / name / "test.json")
        want = evaluate_task(model, tokenizer, task, "mc", limit=2)
        got = r["tasks"][name]
        assert got["n"] == 2 and got["acc"] == want["acc"]
        for a, b in zip(got["samples"], want["samples"]):
            assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-5)
    base = evaluate_task(stories[0], tokenizer, task, "mc", limit=2)["samples"]
    assert base[0]["loglikelihoods"] != pytest.approx(
        r["tasks"]["winogrande"]["samples"][0]["loglikelihoods"], abs=1e-3
    )  # the adapter was applied
    assert "boolq" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "boolq", "--data-dir", "nowhere"], "file not found"),
        (["--data", str(DATA / "README.md")], "not valid JSON"),
        (["--ppl", "missing.jsonl"], "missing.jsonl: file not found"),
    ],
)
def test_cli_data_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model", str(MODEL), *argv])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and message in err and "Traceback" not in err


def test_lm_eval_tasks_need_lm_eval(capsys):
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit) as e:
            main(["--model", str(MODEL), "--lm-eval-tasks", "arc_easy"])
        assert e.value.code == 1
        assert "pip install lm-eval" in capsys.readouterr().err
    else:
        pytest.skip("lm-eval is installed")


def test_lm_eval_model_wraps_the_loaded_model(stories):
    pytest.importorskip("lm_eval")
    from mlx_braces.evaluate import lm_eval_model

    model, tokenizer = stories
    lm = lm_eval_model(model, tokenizer, batch_size=2)
    assert lm._model is model and lm.tokenizer is tokenizer

"""Answer extraction, style labels and correctness (echo_jax.lm.grading)."""

import dataclasses
import json
import os
import pathlib
import time

import pytest

from echo_jax.lm import grading, sandbox
from echo_jax.lm.data import generators
from echo_jax.lm.grading import Extraction, extract_answer, extract_answers, is_correct, style_of

PI_HALF = "\\left( 3, \\frac{\\pi}{2} \\right)"
AIME_TWO = "080 or 081 (both were accepted)"

IS_CORRECT = [  # (pred, ref, dataset, expected)
    ("18", "18", "gsm8k", True),
    ("18.0", "18", "gsm8k", True),
    ("1,000", "1000", "gsm8k", True),
    ("$18", "18", "gsm8k", True),
    ("\\$18", "18", "gsm8k", True),
    (" 18. ", "18", "gsm8k", True),
    ("1{,}234", "1234", "gsm8k", True),
    ("18.000000000000004", "18", "gsm8k", True),
    ("20%", "20", "gsm8k", True),
    ("\\frac{36}{2}", "18", "gsm8k", True),
    ("18 \\text{ dollars}", "18", "gsm8k", True),
    ("18", "She makes 9 * 2 = $<<9*2=18>>18.\n#### 18", "gsm8k", True),
    ("18.5", "18", "gsm8k", False),
    ("17", "18", "gsm8k", False),
    ("180", "18", "gsm8k", False),
    ("-18", "18", "gsm8k", False),
    ("None", "18", "gsm8k", False),
    ("", "18", "gsm8k", False),
    (None, "18", "gsm8k", False),
    ("42", "42", "synthetic", True),
    ("42.0", "42", "synthetic", True),
    ("1,234", "1234", "synthetic", True),
    ("41", "42", "synthetic", False),
    ("4.2", "42", "synthetic", False),
    ("25", "025", "aime24", True),
    ("025", "25", "aime25", True),
    ("25.0", "025", "aime24", True),
    ("250", "025", "aime24", False),
    ("25.5", "025", "aime24", False),
    ("24", "025", "aime_all", False),
    ("080", AIME_TWO, "aime_all", True),
    ("81", AIME_TWO, "aime_all", True),
    ("82", AIME_TWO, "aime_all", False),
    ("0.5", "\\frac{1}{2}", "math500", True),
    ("\\dfrac12", "\\frac{1}{2}", "math500", True),
    ("0.49", "\\frac12", "math500", False),
    ("(3, \\pi/2)", PI_HALF, "math500", True),
    ("(3, \\frac{\\pi}{2})", PI_HALF, "math500", True),
    ("(3, pi/2)", PI_HALF, "math500", True),  # SymPy-style code output
    ("(3, \\pi)", PI_HALF, "math500", False),
    ("10", "10^\\circ", "math500", True),
    ("Evelyn", "\\text{Evelyn}", "math500", True),
    ("'Evelyn'", "\\text{Evelyn}", "math500", True),
    ("Bob", "\\text{Evelyn}", "math500", False),
    ("C", "\\text{(C)}", "math500", True),
    ("D", "\\text{(C)}", "math500", False),
    ("14/3", "\\frac{14}{3}", "math500", True),
    ("4.67", "\\frac{14}{3}", "math500", False),
    ("sqrt(2)/2", "\\frac{\\sqrt{2}}{2}", "math500", True),
    ("3*sqrt(13)", "3\\sqrt{13}", "math500", True),
    ("sqrt(2*(3+5))", "4", "math500", True),
    ("x**2 + 7*x + 10", "x^2+7x+10", "math500", True),
    ("8*pi", "8\\pi", "math500", True),
    ("(-oo, 3)", "(-\\infty, 3)", "math500", True),
    ("(-\\infty, 3]", "(-\\infty, 3)", "math500", False),
    ("1.4142135623730951", "\\sqrt{2}", "math500", True),
    ("1.414", "\\sqrt{2}", "math500", False),
    ("5", "x=5", "math500", True),
    ("52_8", "52_8", "math500", True),
    ("2, 1", "1,2", "math500", True),
    ("2^{10}", "1024", "math500", True),
    (
        "\\begin{pmatrix}1\\\\2\\end{pmatrix}",
        "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}",
        "math500",
        True,
    ),
    (None, "\\frac12", "math500", False),
]


@pytest.mark.parametrize("pred,ref,dataset,expected", IS_CORRECT)
def test_is_correct(pred, ref, dataset, expected):
    assert is_correct(pred, ref, dataset=dataset) is expected


def test_is_correct_rejects_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset"):
        is_correct("1", "1", dataset="gsm9k")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("So \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("First \\boxed{3}, then \\boxed{\\dfrac{7}{2}} at last.", "\\dfrac{7}{2}"),
        ("\\boxed{\\left\\{ 1, {2} \\right\\}}", "\\left\\{ 1, {2} \\right\\}"),
        ("\\fbox{12}", "12"),
        ("done \\boxed{5} then truncated \\boxed{\\frac{1", "5"),  # an unclosed last box is skipped
        ("Total is 1,234 apples.\n#### 1,234", "1,234"),
        ("#### 72 dollars", "72"),
        ("\\boxed{9} beats\n#### 8", "9"),
        ("She has 3 apples and 11 pears, so 14.", "14"),
        ("It costs -2.5 dollars.", "-2.5"),
        ("no numbers at all", None),
    ],
)
def test_text_answer(text, expected):
    assert grading.text_answer(text) == expected


STYLE_OF = [  # (text, paper, strict)
    ("We define x as the number of apples. \\boxed{4}", "tinygsm", "omi2"),
    ("The deficit is 4.", "tinygsm", "other"),
    ("So the answer is \\boxed{4}.", "omi2", "omi2"),
    ("So the answer is 4.", "omi2", "other"),
    ("def simple_math_problem() -> int:\n    return 4\n", "tinygsm", "tinygsm"),
    ("Text first.\ndef helper(x):\n    return x\n", "tinygsm", "tinygsm"),
    ("    def simple_math_problem():\n        return 4", "tinygsm", "other"),  # not top level
    ("def simple_math_problem", "tinygsm", "other"),  # no parenthesis: not a def line
    ("Code:\n<llm-code>\nx = 4\nx\n</llm-code>\n\\boxed{4}", "omi1", "omi1"),
    ("<llm-code>\ndef f(x):\n    return x\nf(4)\n</llm-code>", "omi1", "omi1"),
    ("<llm-code>\nx = 4\n", "omi1", "other"),  # truncated block
    ("Use <llm-code> next time. \\boxed{4}", "omi1", "other"),
    ("Stray </llm-code> tag, \\boxed{4}", "omi2", "other"),
    ("", "omi2", "other"),
]


@pytest.mark.parametrize("text,paper,strict", STYLE_OF)
def test_style_of(text, paper, strict):
    assert style_of(text, "paper") == paper
    assert style_of(text) == strict


def test_style_of_rejects_unknown_rule():
    with pytest.raises(ValueError, match="unknown rule"):
        style_of("x", rule="loose")


TINYGSM = "def simple_math_problem() -> int:\n    '''Q'''\n    a = 16 - 3 - 4\n    return a * 2\n"
EXTRACT = [  # (text, style, answer, status)
    (TINYGSM, "tinygsm", "18", "ok"),
    (TINYGSM + "\nprint(simple_math_problem())\nQuestion: how many 7 cats?", "tinygsm", "18", "ok"),
    (
        "def helper(x):\n    return x + 1\n\ndef simple_math_problem():\n    return helper(41)\n",
        "tinygsm",
        "42",
        "ok",
    ),
    ("import math\ndef simple_math_problem():\n    return math.floor(7.5)\n", "tinygsm", "7", "ok"),
    ("def simple_math_problem():\n    return 5 / 2\n", "tinygsm", "2.5", "ok"),
    ("def simple_math_problem():\n    return 'seven'\n", "tinygsm", "seven", "ok"),
    ("def simple_math_problem():\n    return undefined_name\n", "tinygsm", None, "error"),
    ("def simple_math_problem(:\n    return\n", "tinygsm", None, "error"),
    ("def other():\n    return 3\n", "tinygsm", "3", "error"),  # no simple_math_problem; fallback
    ("def simple_math_problem():\n    while True:\n        pass\n", "tinygsm", None, "timeout"),
    (
        "def simple_math_problem():\n    s = 'x'\n    while True:\n        s += s\n",
        "tinygsm",
        None,
        "memory",
    ),
    ("import os\ndef simple_math_problem():\n    os.abort()\n", "tinygsm", None, "killed"),
    ("We define the cost.\nSo the answer is \\boxed{18}.", "tinygsm", "18", "no_code"),
    (
        "Let's use Python.\n<llm-code>\neggs = 16 - 3 - 4\n</llm-code>\n<llm-code-output>\n"
        "</llm-code-output>\n<llm-code>\neggs * 2\n</llm-code>\n<llm-code-output>\n18\n"
        "</llm-code-output>\nThus \\boxed{18}.",
        "omi1",
        "18",
        "ok",
    ),
    ("<llm-code>\nprint('noise')\nprint(12)\n\n</llm-code>\nSo \\boxed{99}.", "omi1", "12", "ok"),
    (
        "<llm-code>\nfrom fractions import Fraction\nFraction(1, 2) + Fraction(1, 3)\n</llm-code>",
        "omi1",
        "5/6",
        "ok",
    ),
    ("<llm-code>\nx = 3\n</llm-code>", "omi1", "3", "no_answer"),  # nothing printed; fallback
    ("<llm-code>\nwhile True:\n    pass\n</llm-code>", "omi1", None, "timeout"),
    ("<llm-code>\nraise ValueError\n</llm-code>\nI guess \\boxed{7}.", "omi1", "7", "error"),
    ("<llm-code>\nprint(1)\n", "omi1", "1", "no_code"),  # truncated block never runs
    ("Step one.\nSo \\boxed{\\frac{1}{2}}, no wait, \\boxed{18}.", "omi2", "18", "ok"),
    ("Step one.\n#### 1,234", "omi2", "1,234", "ok"),
    ("I am not sure.", "omi2", None, "no_answer"),
]


@pytest.fixture(scope="module")
def extracted():
    """All EXTRACT texts in one batch: also checks a batch mixes styles and failures."""
    start = time.monotonic()
    out = extract_answers([text for text, *_ in EXTRACT])
    return out, time.monotonic() - start


@pytest.mark.parametrize("i", range(len(EXTRACT)))
def test_extract_answers(extracted, i):
    _, style, answer, status = EXTRACT[i]
    got = extracted[0][i]
    assert dataclasses.replace(got, error="") == Extraction(style, answer, status), got.error
    assert bool(got.error) == (status in ("error", "timeout", "memory", "killed")), got


def test_hostile_code_returns_promptly(extracted):
    # Two infinite loops in the batch; the sandbox kills them at timeout_s = 2 s.
    assert extracted[1] < 15.0


def test_extract_answer_single_and_custom_timeout():
    start = time.monotonic()
    loop = extract_answer("<llm-code>\nwhile True:\n    pass\n</llm-code>", timeout_s=0.5)
    assert (loop.style, loop.answer, loop.status) == ("omi1", None, "timeout")
    assert loop.error.startswith("[sandbox] ") and "limit" in loop.error
    assert time.monotonic() - start < 5.0
    assert extract_answer(TINYGSM) == Extraction("tinygsm", "18", "ok")


def test_failed_code_carries_its_error_text():
    text = "<llm-code>\nimport no_such_module_echo\n</llm-code>\nSo \\boxed{3}."
    missing = "ModuleNotFoundError: No module named 'no_such_module_echo'"
    assert extract_answer(text) == Extraction("omi1", "3", "error", missing)  # text fallback
    crash = "def simple_math_problem():\n    return 1 / 0\n"
    graded = grading.grade_batch([text, crash, TINYGSM], ["3", "7", "18"], dataset="gsm8k")
    assert [(g.status, g.correct, g.error) for g in graded] == [
        ("error", True, missing),
        ("error", False, "ZeroDivisionError: division by zero"),
        ("ok", True, ""),
    ]


def test_one_sandbox_round_trip_per_batch(monkeypatch):
    calls = []
    real = sandbox.run_many

    def counting(codes, **kwargs):
        calls.append(len(codes))
        return real(codes, **kwargs)

    monkeypatch.setattr(sandbox, "run_many", counting)
    texts = [TINYGSM, "<llm-code>\nprint(2)\n</llm-code>", "\\boxed{3}", TINYGSM, "no answer"]
    graded = grading.grade_batch(texts, ["18", "2", "3", "17", "0"], dataset="gsm8k")
    assert calls == [3]
    assert [g.correct for g in graded] == [True, True, True, False, False]
    assert [g.style for g in graded] == ["tinygsm", "omi1", "omi2", "tinygsm", "omi2"]
    calls.clear()
    assert grading.rewards(["\\boxed{3}", "#### 4"], ["3", "5"], dataset="gsm8k") == [1.0, 0.0]
    assert calls == []  # no code, no sandbox


def test_reward_and_grade_batch_validation():
    assert grading.reward(TINYGSM, "18", dataset="synthetic") == 1.0
    assert grading.reward(TINYGSM, "19", dataset="synthetic") == 0.0
    assert grading.reward("\\boxed{\\dfrac{1}{2}}", "\\frac12", dataset="math500") == 1.0
    with pytest.raises(ValueError, match="refs"):
        grading.grade_batch(["a", "b"], ["1"], dataset="gsm8k")


def test_math_verify_in_a_worker_thread():
    # math_verify's SIGALRM timeout raises outside the main thread unless it is switched off.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(is_correct, "0.5", "\\frac{1}{2}", dataset="math500").result()
        assert not pool.submit(is_correct, "0.49", "\\frac{1}{2}", dataset="math500").result()


N_GENERATED = 1000


@pytest.fixture(scope="module")
def generated():
    """N_GENERATED completions per style (the solution that follows the prompt), levels 1..6."""
    problems = [generators.make_problem(7, i, 1 + i % 6) for i in range(N_GENERATED)]
    texts = {s: [generators.render_solution(p, s) for p in problems] for s in generators.STYLES}
    return problems, texts


def test_strict_style_is_exact_on_generator_outputs(generated):
    problems, texts = generated
    examples = {s: [generators.format_example(p, s) for p in problems] for s in generators.STYLES}
    for style in generators.STYLES:
        assert [style_of(t) for t in texts[style]] == [style] * N_GENERATED
        assert [style_of(t) for t in examples[style]] == [style] * N_GENERATED
        # The generator keeps "def" out of its prose, so the study's rule agrees here too.
        assert [style_of(t, "paper") for t in examples[style]] == [style] * N_GENERATED


def test_extraction_recovers_every_generated_answer(generated):
    problems, texts = generated
    refs = [str(p.answer) for p in problems]
    for style in generators.STYLES:
        graded = grading.grade_batch(texts[style], refs, dataset="synthetic")
        assert [(g.style, g.status) for g in graded] == [(style, "ok")] * N_GENERATED
        assert [g.answer for g in graded] == refs
        assert all(g.correct for g in graded)
    wrong = [str(p.answer + 1) for p in problems[:50]]
    assert not any(grading.rewards(texts["tinygsm"][:50], wrong, dataset="synthetic"))


def _data_dir() -> pathlib.Path:
    root = pathlib.Path(
        os.environ.get("ECHO_JAX_DATA")
        or pathlib.Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
    )
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root}; set ECHO_JAX_DATA")
    return root


def _jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_real_references_grade_themselves():
    root = _data_dir()
    math500 = _jsonl(root / "math500" / "test.jsonl")
    for row in math500:  # each reference solution's last boxed answer matches its answer field
        boxed = grading.last_boxed(row["solution"])
        assert is_correct(boxed, row["answer"], dataset="math500"), row
    answers = [row["answer"] for row in math500]
    wrong = sum(is_correct(answers[i - 1], answers[i], dataset="math500") for i in range(100))
    assert wrong <= 3  # neighbours differ; equal neighbours ("7", "7") are the only matches
    for row in _jsonl(root / "gsm8k" / "test.jsonl"):
        ref = row["answer"].split("####")[-1].strip()
        assert is_correct(grading.text_answer(row["answer"]), ref, dataset="gsm8k")
    for name, dataset in (
        ("aime24", "aime24"),
        ("aime25", "aime25"),
        ("aime_1983_2024", "aime_all"),
    ):
        for row in _jsonl(root / "aime" / f"{name}.jsonl"):
            pred = str(int(row["answer"][:3]))
            assert is_correct(pred, row["answer"], dataset=dataset), row["answer"]
            assert not is_correct(str((int(pred) + 2) % 1000), row["answer"], dataset=dataset)


def test_sympy_code_output_is_graded_as_math():
    # OMI1 code prints SymPy syntax (sqrt(2)/2, pi); grading must read it as math, not as p*i.
    code = (
        "<llm-code>\nfrom sympy import sqrt, pi, Rational\nprint(sqrt(2) / 2)\n</llm-code>\n"
        "<llm-code>\n(3, pi / 2)\n</llm-code>"
    )
    graded = grading.grade_batch(
        [code, code], [PI_HALF, "\\frac{\\sqrt{2}}{2}"], dataset="math500", timeout_s=20.0
    )
    got = [(g.style, g.answer, g.status) for g in graded]
    assert got == [("omi1", "(3, pi/2)", "ok")] * 2, [g.error for g in graded]
    assert [g.correct for g in graded] == [True, False]

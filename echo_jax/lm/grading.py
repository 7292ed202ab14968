"""Answer extraction, style labels and correctness for the RL reward (study A).

The study labels a completion's style by the same branch that extracts its answer:
`<llm-code>` -> run the code, answer = last output line (OMI1); else the substring `def` -> run
`simple_math_problem()` (TinyGSM); else parse `\\boxed{}` (OMI2 / text). Where the code branch
yields no answer (no runnable code, a crash, a timeout) the study's code falls through to parsing
the text, so we do too: the label stays, `status` records the failure and the answer (if any)
comes from the text. Generated code never runs in this process: every program of a batch goes
through one `sandbox.run_many` call.

Two deliberate differences from the study's code: all `<llm-code>` blocks run as one program and
the answer is the last line printed (the last bare expression is printed, as in a notebook cell),
where the study ran the first block and eval'ed its last line; and GSM8K / synthetic / AIME answers
are compared as numbers, not through math_verify (which the study used for everything).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import re
import threading
from collections.abc import Sequence
from fractions import Fraction

from math_verify import parse, verify

from echo_jax.core.config import ConfigError
from echo_jax.lm import sandbox

STYLE_LABELS = ("tinygsm", "omi1", "omi2", "other")
DATASETS = ("synthetic", "gsm8k", "math500", "aime24", "aime25", "aime_all")

_CALL = "_echo_answer"  # harness function every program defines; one name for the whole batch
_LLM_BLOCK = re.compile(r"<llm-code>(.*?)</llm-code>", re.S)
_DEF_LINE = re.compile(r"^def\s+[A-Za-z_]\w*\s*\(", re.M)
_IMPORT_LINE = re.compile(r"^(?:import|from)\s+\w")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES = re.compile(r"####\s*([^\n]*)")
_NUMBER = re.compile(r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")
_NUMERIC_NOISE = re.compile(r"\\\$|\$|,|\{,\}|\\[!,;: ]|\\%|%|\s")
_MV_TIMEOUT_S = 5
_BRACES = {"{": 1, "}": -1}
_PARENS = {"(": 1, ")": -1}

_OMI1_HARNESS = """import ast as _ast
import contextlib as _contextlib
import io as _io


def {call}():
    tree = _ast.parse({src!r})
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], _ast.Expr) else None
    env = {{"__name__": "__main__"}}
    out = _io.StringIO()
    with _contextlib.redirect_stdout(out):
        exec(compile(tree, "<llm-code>", "exec"), env)
        if last is not None:
            value = eval(compile(_ast.Expression(last.value), "<llm-code>", "eval"), env)
            if value is not None:
                print(value)
    return out.getvalue()
"""

_TINYGSM_HARNESS = """{src}


def {call}():
    return str(simple_math_problem())
"""


@dataclasses.dataclass(frozen=True)
class Extraction:
    """`style` is the study's label; `status` is "ok", "no_answer", "no_code" or the sandbox's
    failure status ("error", "timeout", "memory", "killed"). A non-"ok" code status with an
    answer means the answer came from the text fallback. `error` is the sandbox's one-line
    reason for a failure status (`SandboxResult.error`), "" otherwise."""

    style: str
    answer: str | None
    status: str
    error: str = ""


@dataclasses.dataclass(frozen=True)
class Graded:
    """An `Extraction` judged against its reference; `reward` is the study's 0/1 reward."""

    style: str
    answer: str | None
    correct: bool
    status: str
    error: str = ""

    @property
    def reward(self) -> float:
        return 1.0 if self.correct else 0.0


def style_of(text: str, rule: str = "strict") -> str:
    """Labels a completion "tinygsm", "omi1", "omi2" or "other".

    rule="paper" is the study's branch test verbatim: `<llm-code>` anywhere -> "omi1", else the
    substring `def` anywhere (so "define", "deficit" too) -> "tinygsm", else "omi2" -- the study's
    third branch ("text") takes every remaining completion, boxed or not, so "paper" never says
    "other". rule="strict" checks the markers: a complete `<llm-code>...</llm-code>` block ->
    "omi1"; a top-level `def name(` line -> "tinygsm"; a `\\boxed{` with no llm-code tag ->
    "omi2"; anything else (a truncated code block, prose without a boxed answer) -> "other".
    """
    if rule == "paper":
        if "<llm-code>" in text:
            return "omi1"
        return "tinygsm" if "def" in text else "omi2"
    if rule != "strict":
        raise ValueError(f"style_of: unknown rule {rule!r} (use 'strict' or 'paper')")
    if _LLM_BLOCK.search(text):
        return "omi1"
    if _DEF_LINE.search(text):
        return "tinygsm"
    if "llm-code" not in text and _BOXED.search(text):
        return "omi2"
    return "other"


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` / `\\fbox{...}`, nested braces balanced."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += _BRACES.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def text_answer(text: str) -> str | None:
    """Natural-language answer: last boxed, else GSM8K's `#### x`, else the last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    hashes = _HASHES.findall(text)
    if hashes:
        number = _NUMBER.search(hashes[-1])
        return number.group().rstrip(",") if number else hashes[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1].rstrip(",") if numbers else None


def _tinygsm_code(text: str) -> str | None:
    """Top-level `def` blocks (def line + indented/blank lines) and import lines; the completion
    may carry junk (prose, a call, a second question) after the function."""
    kept, inside, found = [], False, False
    for line in text.splitlines():
        if _DEF_LINE.match(line):
            inside = found = True
        elif not (inside and (not line.strip() or line[0] in " \t")):
            inside = False
            if not _IMPORT_LINE.match(line):
                continue
        kept.append(line)
    return "\n".join(kept) if found else None


def _program(text: str, style: str) -> str | None:
    """The sandbox program for a code-style completion; it defines `_CALL` returning a str."""
    if style == "omi1":
        blocks = _LLM_BLOCK.findall(text)
        return _OMI1_HARNESS.format(call=_CALL, src="\n".join(blocks)) if blocks else None
    if style == "tinygsm":
        code = _tinygsm_code(text)
        return _TINYGSM_HARNESS.format(call=_CALL, src=code) if code is not None else None
    return None


def _code_answer(style: str, value: str | None) -> str | None:
    """Decodes the harness's return value (repr of a str) into the style's answer."""
    try:
        out = ast.literal_eval(value) if value is not None else None
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if not isinstance(out, str):
        return None
    if style == "omi1":
        lines = [line.strip() for line in out.splitlines() if line.strip()]
        return lines[-1] if lines else None
    return out.strip() or None


def extract_answers(
    texts: Sequence[str], *, timeout_s: float = 2.0, memory_mb: int = 256
) -> list[Extraction]:
    """Extracts every completion's answer; all code of the batch runs in one `run_many` call."""
    styles = [style_of(text, "paper") for text in texts]
    programs = [_program(text, style) for text, style in zip(texts, styles)]
    runnable = [i for i, program in enumerate(programs) if program is not None]
    results = {}
    if runnable:
        ran = sandbox.run_many(
            [programs[i] for i in runnable], timeout_s=timeout_s, memory_mb=memory_mb, call=_CALL
        )
        results = dict(zip(runnable, ran))
    return [
        _extraction(text, style, results.get(i))
        for i, (text, style) in enumerate(zip(texts, styles))
    ]


def _extraction(text: str, style: str, result: sandbox.SandboxResult | None) -> Extraction:
    """Code answer when the code ran and printed/returned one, else the text's answer."""
    if style == "omi2":
        answer = text_answer(text)
        return Extraction(style, answer, "ok" if answer is not None else "no_answer")
    if result is None:
        return Extraction(style, text_answer(text), "no_code")
    if result.status != "ok":
        return Extraction(style, text_answer(text), result.status, result.error)
    answer = _code_answer(style, result.value)
    if answer is None:
        return Extraction(style, text_answer(text), "no_answer")
    return Extraction(style, answer, "ok")


def extract_answer(text: str, *, timeout_s: float = 2.0, memory_mb: int = 256) -> Extraction:
    return extract_answers([text], timeout_s=timeout_s, memory_mb=memory_mb)[0]


def _to_number(text: str) -> Fraction | None:
    """ "$1,000", "18.0", "-3/4", "20\\%" -> exact Fraction; None when not a plain number."""
    cleaned = _NUMERIC_NOISE.sub("", text.replace("\u2212", "-")).rstrip(".")
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def math_verify_timeout() -> int | None:
    """math_verify times out with SIGALRM, which only works in the main thread; elsewhere it
    must run without a timeout (it raises otherwise)."""
    return _MV_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=8192)
def _mv_parse(latex: str) -> tuple:
    return tuple(parse(latex, parsing_timeout=math_verify_timeout()))


def _replace_sqrt(text: str) -> str:
    """`sqrt(a*(b+c))` -> `\\sqrt{a*(b+c)}`, matching parentheses; unbalanced text is left as is."""
    start = text.find("sqrt(")
    while start != -1:
        depth, end = 0, -1
        for i in range(start + 4, len(text)):
            depth += _PARENS.get(text[i], 0)
            if depth == 0:
                end = i
                break
        if end == -1:
            return text
        text = text[:start] + "\\sqrt{" + text[start + 5 : end] + "}" + text[end + 1 :]
        start = text.find("sqrt(")
    return text


def _latexify(answer: str) -> str:
    """Code prints SymPy / Python syntax (`pi/2`, `sqrt(2)`, `x**2`, `5*I`, `oo`); math_verify's
    LaTeX parser would read `pi` as p*i and rejects `**`. LaTeX answers pass unchanged."""
    answer = answer.strip()
    if len(answer) >= 2 and answer[0] == answer[-1] and answer[0] in "'\"":
        answer = answer[1:-1]
    if "\\" in answer:
        return answer
    answer = _replace_sqrt(answer)
    answer = re.sub(r"\*\*\s*(\([^()]*\)|[\w.]+)", r"^{\1}", answer)
    answer = answer.replace("*", " \\cdot ")
    for word, latex in (("pi", "\\pi"), ("oo", "\\infty"), ("I", "i"), ("E", "e")):
        answer = re.sub(rf"\b{word}\b", lambda _: latex, answer)  # noqa: B023  (used at once)
    return answer


def _math_equal(pred: str, ref: str) -> bool:
    """math_verify with the gold as `$ref$` and the prediction as `\\boxed{pred}`; verify is not
    symmetric, gold goes first."""
    gold, target = _mv_parse(f"${ref}$"), _mv_parse(f"\\boxed{{{_latexify(pred)}}}")
    if not gold or not target:
        return False
    return bool(verify(list(gold), list(target), timeout_seconds=math_verify_timeout()))


def _numbers_equal(pred: str, refs: Sequence[str], rel_tol: float) -> bool:
    """Numeric match against any alternative; where either side is not a plain number (LaTeX
    such as `\\frac{36}{2}` or `18 \\text{ dollars}`) math_verify judges instead."""
    value = _to_number(pred)
    for ref in refs:
        target = _to_number(ref)
        if value is None or target is None:
            if _math_equal(pred, ref):
                return True
        elif abs(value - target) <= rel_tol * max(1, abs(target)):
            return True
    return False


def is_correct(pred: str | None, ref: str, *, dataset: str) -> bool:
    """Judges an extracted answer against the reference answer of `dataset`.

    GSM8K / synthetic: numbers (`$`, commas, spaces, trailing `.0` ignored; relative tolerance 1e-6,
    as math_verify's 6-digit float rounding); a full GSM8K solution as ref is cut after `####`.
    AIME: integers, leading zeros ignored; a ref with several integers ("080 or 081 (both were
    accepted)") accepts any of them. MATH-500: HF math_verify.
    """
    if dataset not in DATASETS:
        raise ConfigError(f"is_correct: unknown dataset {dataset!r}; expected one of {DATASETS}")
    if pred is None or not pred.strip():
        return False
    if dataset == "math500":
        return _math_equal(pred, ref)
    if dataset.startswith("aime"):
        return _numbers_equal(pred, re.findall(r"-?\d+", ref), rel_tol=0.0)
    return _numbers_equal(pred, [ref.split("####")[-1]], rel_tol=1e-6)


GRADERS = ("strict", "paper")


def grade_batch(
    texts: Sequence[str],
    refs: Sequence[str],
    *,
    dataset: str,
    timeout_s: float = 2.0,
    memory_mb: int = 256,
    rule: str = "strict",
    prompts: Sequence[str] | None = None,
) -> list[Graded]:
    """Style, answer and correctness of every completion; one sandbox round trip per batch.

    rule="strict" is this module's grader (completions alone; see the module docstring);
    rule="paper" is the study's own (`paper_grading`: the prompt + completion as the study
    decoded it, math_verify for every answer), with `prompts` the texts the completions continue.
    """
    if rule not in GRADERS:
        raise ConfigError(f"grade_batch: unknown rule {rule!r}; valid: {GRADERS}")
    if len(texts) != len(refs):
        raise ValueError(f"grade_batch: {len(texts)} texts but {len(refs)} refs")
    if rule == "paper":
        from echo_jax.lm.paper_grading import grade_paper  # it builds on this module

        return grade_paper(texts, refs, prompts=prompts, timeout_s=timeout_s, memory_mb=memory_mb)
    extractions = extract_answers(texts, timeout_s=timeout_s, memory_mb=memory_mb)
    return [
        Graded(e.style, e.answer, is_correct(e.answer, ref, dataset=dataset), e.status, e.error)
        for e, ref in zip(extractions, refs)
    ]


def rewards(
    texts: Sequence[str], refs: Sequence[str], *, dataset: str, timeout_s: float = 2.0
) -> list[float]:
    """The study's 0/1 reward per completion (use `grade_batch` to also get the style labels)."""
    return [g.reward for g in grade_batch(texts, refs, dataset=dataset, timeout_s=timeout_s)]


def reward(text: str, ref: str, *, dataset: str, timeout_s: float = 2.0) -> float:
    return rewards([text], [ref], dataset=dataset, timeout_s=timeout_s)[0]

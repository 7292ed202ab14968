"""The study's grader (`grading.grade_batch(..., rule="paper")`), as `openrlhf/utils/
math_verifier.py` of `rosieyzh/openrlhf-pretrain` computes its reward and style label, with the
code run in our sandbox instead of the trainer's process.

Per completion the study grades the *query*: the decoded prompt followed by the completion, with
`</s>` removed (its `reward_func`; its evaluation script and its Expert Iteration grade the
completion alone: pass no prompts). The study's prompt is the bare question, so its model writes
the `\n\n` that separates question and solution in pretraining; ours is given it in the prompt
(`question + "\n\n"`), so a completion graded alone is read as `"\n\n" + completion`, the text
the study's model would have produced (without it, a TinyGSM completion starts with `def` at
position 0, the `\ndef` split below misses it and the program fails). Then, in order:

1. if `<llm-code>` occurs: run the *first* `<llm-code>...</llm-code>` block (stripped) with
   `exec`, then `str(eval(last line))` in the same globals. A block ending in `print(x)` yields
   the string "None"; one ending in an assignment fails (`eval` of a statement). Label "omi1".
2. else, or when step 1 gave nothing, if the substring `def` occurs anywhere (in "define" too, or
   in the prompt): run `'def' + query.split('\\ndef')[-1]` with `exec(code, {}, names)` and return
   `str(names['simple_math_problem']())`; prose after the function is a SyntaxError, a helper
   function is not visible to it (separate globals and locals). Label "tinygsm".
3. an answer from step 1 or 2 is `math_verify.parse`d; else the whole query is. A query that
   entered no branch is labelled "omi2" (the study's "text").

Correct = `math_verify.verify(parse(gold), prediction)`, any exception counting as wrong; the
label is the last branch entered ("text"/"omi2" on an exception, as its evaluation script does).
The study's 3 s alarm becomes the sandbox's time limit. `Graded.status` is "ok" when a code
branch answered, "no_code" for a text answer, else the failing program's sandbox status.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence

from math_verify import parse, verify

from echo_jax.lm import sandbox
from echo_jax.lm.grading import Graded, math_verify_timeout

_CALL = "_echo_answer"
_FIRST_BLOCK = re.compile(r"<llm-code>(.*?)</llm-code>", re.S)
_STYLE = {"llm-code": "omi1", "tinygsm-code": "tinygsm", "text": "omi2"}

_LLM_CODE = """_SRC = {src!r}


def {call}():
    env = {{}}
    exec(_SRC, env)
    return str(eval(_SRC.split("\\n")[-1], env))
"""

_TINYGSM_CODE = """_SRC = {src!r}


def {call}():
    names = {{}}
    exec(_SRC, {{}}, names)
    return str(names["simple_math_problem"]())
"""


def llm_code_program(query: str) -> str | None:
    """The sandbox program of branch 1; None without a complete block (nothing runs)."""
    match = _FIRST_BLOCK.search(query)
    return _LLM_CODE.format(src=match.group(1).strip(), call=_CALL) if match else None


def tinygsm_program(query: str) -> str:
    """The sandbox program of branch 2."""
    return _TINYGSM_CODE.format(src="def" + query.split("\ndef")[-1], call=_CALL)


def _run(programs: dict[int, str], timeout_s: float, memory_mb: int) -> dict:
    """index -> (output str or None, sandbox result) for the programs of one branch."""
    if not programs:
        return {}
    indices = list(programs)
    results = sandbox.run_many(
        [programs[i] for i in indices], timeout_s=timeout_s, memory_mb=memory_mb, call=_CALL
    )
    out = {}
    for i, result in zip(indices, results):
        value = None
        if result.status == "ok" and result.value is not None:
            try:
                value = ast.literal_eval(result.value)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                value = None
        out[i] = (value if isinstance(value, str) else None, result)
    return out


def _judge(answer_text: str, gold: str) -> tuple[bool, str | None, bool]:
    """(correct, the parsed prediction as text, raised): `verify(parse(gold),
    parse(answer_text))` as the study calls it."""
    timeout = math_verify_timeout()
    try:
        prediction = parse(answer_text, parsing_timeout=timeout)
        target = parse(str(gold), parsing_timeout=timeout)
        correct = bool(verify(target, prediction, timeout_seconds=timeout))
    except Exception:  # noqa: BLE001 - the study scores any failure 0
        return False, None, True
    return correct, (str(prediction[-1]) if prediction else None), False


def _status(answer: str | None, result: sandbox.SandboxResult | None) -> str:
    if answer is not None:
        return "ok"
    return "no_code" if result is None else result.status


# what the study's completions begin with and ours do not (the prompt holds it): module docstring
COMPLETION_PREFIX = "\n\n"


def grade_paper(
    texts: Sequence[str],
    refs: Sequence[str],
    *,
    prompts: Sequence[str] | None = None,
    timeout_s: float = 3.0,
    memory_mb: int = 256,
) -> list[Graded]:
    """The study's reward and label of each completion (module docstring); `prompts[i]` is
    the text completion i continued (omit it to grade completions alone). Two sandbox round trips
    per batch at most: the `<llm-code>` programs, then the `def` programs."""
    if len(texts) != len(refs) or (prompts is not None and len(prompts) != len(texts)):
        raise ValueError(f"grade_paper: {len(texts)} texts, {len(refs)} refs, prompts mismatch")
    queries = [
        ((prompts[i] if prompts is not None else COMPLETION_PREFIX) + text).replace("</s>", "")
        for i, text in enumerate(texts)
    ]
    llm = _run(
        {
            i: program
            for i, q in enumerate(queries)
            if "<llm-code>" in q and (program := llm_code_program(q)) is not None
        },
        timeout_s,
        memory_mb,
    )
    tinygsm = _run(
        {
            i: tinygsm_program(q)
            for i, q in enumerate(queries)
            if "def" in q and llm.get(i, (None,))[0] is None
        },
        timeout_s,
        memory_mb,
    )
    graded = []
    for i, (query, gold) in enumerate(zip(queries, refs)):
        kind, answer, result = "text", None, None
        if "<llm-code>" in query:
            kind = "llm-code"
            answer, result = llm.get(i, (None, None))
        if answer is None and "def" in query:
            kind = "tinygsm-code"
            answer, result = tinygsm[i]
        correct, predicted, raised = _judge(answer if answer is not None else query, gold)
        graded.append(
            Graded(
                style=_STYLE["text" if raised else kind],
                answer=predicted,
                correct=correct,
                status=_status(answer, result),
                error=result.error if result is not None and answer is None else "",
            )
        )
    return graded

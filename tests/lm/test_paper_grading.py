"""The study's grader (rule="paper"): its own examples and its quirks, table-driven."""

import pytest

from echo_jax.lm import grading
from echo_jax.lm.data import generators

GSM8K_GOLD = (
    "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day. She makes 9 * 2 = $<<9*2=18>>18 "
    "every day at the farmer’s market. #### 18"
)
TINYGSM = (
    "\n\ndef simple_math_problem() -> int:\n    '''\n    Janet's ducks lay 16 eggs per day.\n"
    "    '''\n    eggs = 16 - 3 - 4\n    result = eggs * 2\n    return result\n"
)
TINYGSM_WRONG = TINYGSM.replace("eggs * 2", "eggs * 3")
OMI1 = (
    "\n\nLet's solve this problem using Python code.\n<llm-code>\neggs = 16 - 3 - 4\neggs * 2\n"
    "</llm-code>\n<llm-code-output>\n18\n</llm-code-output>\nThus she makes \\boxed{18} dollars."
)
OMI2 = "\n\nShe sells 16 - 3 - 4 = 9 eggs for $2 each, so she makes \\boxed{18} dollars."

# (completion, prompt, expected style, expected correct, why)
CASES = [
    (GSM8K_GOLD, "", "omi2", True, "the study's own check: the gold graded against itself"),
    (OMI1, "", "omi1", True, "first block, last line eval'ed"),
    (OMI2, "", "omi2", True, "text: math_verify parses the boxed answer"),
    (TINYGSM, "", "tinygsm", True, "simple_math_problem() returns 18"),
    (TINYGSM_WRONG, "", "tinygsm", False, "returns 27"),
    (OMI2.replace("{18}", "{6}"), "", "omi2", False, "a wrong boxed answer"),
    (
        "<llm-code>\nx = 16 - 3 - 4\nprint(x * 2)\n</llm-code>\nSo the answer is 7.",
        "",
        "omi1",
        False,
        "a block ending in print(...) evaluates to 'None'; the text says 7",
    ),
    (
        "<llm-code>\nx = 18\nx\n</llm-code>\n<llm-code>\ny = 5\ny\n</llm-code>",
        "",
        "omi1",
        True,
        "only the first block runs",
    ),
    (
        "<llm-code>\nanswer = 18\n</llm-code>\nThe total is \\boxed{18}.",
        "",
        "omi1",
        True,
        "an assignment as last line fails to eval: the text fallback still answers 18",
    ),
    (
        "<llm-code>\nanswer = 18\n</llm-code>\nThe total is \\boxed{9}.",
        "",
        "omi1",
        False,
        "the same failure with a wrong text answer",
    ),
    (
        "Let us define the cost: 16 - 3 - 4 = 9 eggs, times 2 is \\boxed{18}.",
        "",
        "tinygsm",
        True,
        "the substring 'def' in 'define' enters the code branch; its SyntaxError falls back",
    ),
    (
        OMI2,
        "A farmer has a deficit of eggs. How much does she make?\n\n",
        "tinygsm",
        True,
        "'def' in the prompt (the study grades prompt + completion) labels a text answer",
    ),
    (
        TINYGSM + "\nThe answer is 18.",
        "",
        "tinygsm",
        True,
        "prose after the function: SyntaxError, text fallback finds 18",
    ),
    (
        "\n\ndef helper():\n    return 9\n\ndef simple_math_problem():\n    return helper() * 2\n",
        "",
        "tinygsm",
        False,
        "only the last def runs: helper is undefined, and the text holds no 18",
    ),
    (
        "\n\ndef simple_math_problem():\n    return 18\n</s>",
        "",
        "tinygsm",
        True,
        "</s> is removed before grading",
    ),
]


@pytest.mark.parametrize("text,prompt,style,correct,why", CASES, ids=[c[-1][:40] for c in CASES])
def test_the_study_grader_case_by_case(text, prompt, style, correct, why):
    (graded,) = grading.grade_batch(
        [text], [GSM8K_GOLD], dataset="gsm8k", rule="paper", prompts=[prompt]
    )
    assert (graded.style, graded.correct) == (style, correct), (why, graded)


def test_one_batch_grades_like_one_at_a_time_and_reports_failures():
    texts = [c[0] for c in CASES]
    prompts = [c[1] for c in CASES]
    graded = grading.grade_batch(
        texts, [GSM8K_GOLD] * len(texts), dataset="gsm8k", rule="paper", prompts=prompts
    )
    assert [(g.style, g.correct) for g in graded] == [(c[2], c[3]) for c in CASES]
    failed = graded[8]  # the assignment as last line
    assert failed.status == "error" and "SyntaxError" in failed.error
    assert graded[2].status == "no_code" and graded[2].answer == "18"
    assert graded[3].status == "ok" and graded[3].answer == "18"


def test_the_strict_grader_differs_where_the_study_is_quirky():
    quirky = [CASES[6][0], CASES[10][0]]  # the trailing print, "define" in prose
    strict = grading.grade_batch(quirky, ["18", "18"], dataset="gsm8k")
    paper = grading.grade_batch(quirky, [GSM8K_GOLD] * 2, dataset="gsm8k", rule="paper")
    assert [g.correct for g in strict] == [True, True]
    assert [g.correct for g in paper] == [False, True]


def test_the_study_grader_rewards_our_rendered_solutions_unless_omi1_prints():
    problems = [generators.make_problem(3, i, 1 + i % 3) for i in range(12)]
    refs = [str(p.answer) for p in problems]
    for style in generators.STYLES:
        texts = [generators.render_solution(p, style) for p in problems]
        prompts = [p.question + "\n\n" for p in problems]
        graded = grading.grade_batch(texts, refs, dataset="gsm8k", rule="paper", prompts=prompts)
        assert all(g.correct for g in graded), (style, graded)
        assert {g.style for g in graded} <= {style, "tinygsm"}  # a question may contain "def"
        # alone (as the study's evaluation grades): read as the study's model writes them, after
        # the "\n\n" our prompts hold, so a TinyGSM function at position 0 is still found
        alone = grading.grade_batch(texts, refs, dataset="gsm8k", rule="paper")
        assert [(g.style, g.correct) for g in alone] == [(style, True)] * len(texts), alone
    printing = [generators.render_solution(p, "omi1", omi1_print_share=1.0) for p in problems]
    graded = grading.grade_batch(printing, refs, dataset="gsm8k", rule="paper")
    assert not any(g.correct for g in graded)  # eval(print(x)) is None: never rewarded

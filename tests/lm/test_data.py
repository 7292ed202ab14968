"""Generated problems, splits, sources, mixture presets, real-data loaders and the download CLI."""

import collections
import contextlib
import io
import json
import os
import re

import pytest

from echo_jax.core import files
from echo_jax.core.config import MissingFileError
from echo_jax.lm.data import download, generators, mixtures, real, templates

N_PROBLEMS = 2400  # 400 per level, enough to hit every template at every level


@pytest.fixture(scope="module")
def problems():
    return [generators.make_problem(3, i, 1 + i % 6) for i in range(N_PROBLEMS)]


def _boxed(text: str) -> list[str]:
    return re.findall(r"\\boxed\{([^{}]*)\}", text)


def test_make_problem_is_deterministic_and_seeded():
    a = [generators.make_problem(0, i, 3) for i in range(50)]
    b = [generators.make_problem(0, i, 3) for i in range(50)]
    c = [generators.make_problem(1, i, 3) for i in range(50)]
    assert a == b
    assert sum(p.question != q.question for p, q in zip(a, c)) > 45
    with pytest.raises(ValueError, match="level"):
        generators.make_problem(0, 0, 7)


def test_levels_templates_and_numbers(problems):
    by_template = collections.defaultdict(set)
    for p in problems:
        ops = [s for s in p.steps if s.kind != "given"]
        assert len(ops) == p.level  # level = number of arithmetic steps
        assert p.answer == ops[-1].value and isinstance(p.answer, int) and p.answer >= 0
        assert all(2 <= s.value <= 999 for s in p.steps if s.kind != "given")
        by_template[p.template].add(p.level)
    assert len(by_template) >= 16
    assert set(by_template) == {t.name for t in templates.TEMPLATES}
    assert all(levels == set(generators.LEVELS) for levels in by_template.values())


def test_tinygsm_functions_return_the_answer(problems):
    for p in problems:
        solution = generators.render_solution(p, "tinygsm")
        head = f'def simple_math_problem() -> int:\n    """\n    {p.question}\n    """\n'
        assert solution.startswith(head)
        assert solution.endswith("\n    return result") and "\n    result = " in solution
        namespace = {}
        exec(solution, namespace)  # our own generated code, not model output
        value = namespace["simple_math_problem"]()
        assert value == p.answer and isinstance(value, int), (p.uid, value, p.answer)


def test_omi1_code_ends_in_the_answer_as_configured(problems):
    block = re.compile(
        r"<llm-code>\n(.*?)\n</llm-code>\n<llm-code-output>\n(.*?)\n</llm-code-output>\n", re.S
    )
    for p in problems:
        for share in (0.0, 1.0):  # a bare last expression (the default), or print(answer)
            solution = generators.render_solution(p, "omi1", share)
            ((code, output),) = block.findall(solution)
            env, out = {}, io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(code, env)
                last = eval(code.splitlines()[-1], env)  # what the study's grader reads
            printed = out.getvalue().strip().splitlines()
            if share:
                assert last is None and printed[-1] == output == str(p.answer)
            else:
                assert str(last) == output == str(p.answer) and not printed
            assert _boxed(solution)[-1] == str(p.answer)
            assert "def" not in block.sub("", solution)  # prose must not trip the labeller
    shares = [generators.ends_in_print(p, 0.3) for p in problems]
    assert 0.15 < sum(shares) / len(shares) < 0.45, len(shares)


def test_omi2_prose_arithmetic_is_right_and_boxed(problems):
    equation = re.compile(r"([\d()*/+\- ]+) = (\d+)")
    for p in problems:
        solution = generators.render_solution(p, "omi2")
        assert _boxed(solution)[-1] == str(p.answer)
        assert solution.rstrip(".").endswith(f"\\boxed{{{p.answer}}}")
        assert "<llm-code>" not in solution and "def" not in solution
        equations = equation.findall(solution)
        assert len(equations) == p.level
        for lhs, rhs in equations:
            assert eval(lhs.strip()) == int(rhs), (p.uid, lhs, rhs)  # digits and operators only


def test_format_example_is_question_blank_line_solution(problems):
    p = problems[0]
    for style in generators.STYLES:
        text = generators.format_example(p, style)
        assert text == p.question + "\n\n" + generators.render_solution(p, style)
        assert "\n\n" not in p.question
    with pytest.raises(ValueError, match="tinygsm"):
        generators.render_solution(p, "latex")


def test_splits_have_the_right_sizes_and_are_disjoint():
    problems = [generators.make_problem(11, i, 1 + i % 6) for i in range(20_000)]
    groups = collections.defaultdict(list)
    for p in problems:
        groups[generators.split_of(p)].append(p)
    assert set(groups) == set(generators.SPLITS)
    expected = {"train": 0.85, "rl": 0.05, "validation": 0.05, "test": 0.05}
    for split, share in expected.items():
        assert abs(len(groups[split]) / len(problems) - share) < 0.015, split
    for a in generators.SPLITS:
        for b in generators.SPLITS:
            if a < b:
                assert not {p.uid for p in groups[a]} & {p.uid for p in groups[b]}
                assert not {p.question for p in groups[a]} & {p.question for p in groups[b]}


def test_split_ignores_names_but_not_numbers():
    p = generators.make_problem(0, 5, 2)
    renamed = p.question.replace(p.question.split()[0], "Zed")
    assert generators.split_of(p) == generators.split_of(
        generators.Problem(
            p.uid, p.template, p.level, renamed, p.answer, p.steps, p.key, p.conclusion, p.variant
        )
    )
    splits = {generators.split_of(generators.make_problem(0, i, 2)) for i in range(200)}
    assert len(splits) == 4


def test_problem_source_is_deterministic_and_in_split():
    src = generators.ProblemSource("rl", 0, (2, 5), 300, "omi2")
    again = generators.ProblemSource("rl", 0, (2, 5), 300, "omi2")
    assert len(src) == 300
    assert [again[i] for i in reversed(range(300))][::-1] == [src[i] for i in range(300)]
    item = src[7]
    assert set(item) == {"uid", "question", "answer", "level", "template", "style", "text"}
    assert item["style"] == "omi2" and item["text"] == generators.format_example(
        src.problem(7), "omi2"
    )
    assert all(generators.split_of(src.problem(i)) == "rl" for i in range(300))
    levels = collections.Counter(src[i]["level"] for i in range(300))
    assert set(levels) == {2, 5} and min(levels.values()) > 100
    assert src[-1] == src[299]
    with pytest.raises(IndexError):
        src[300]
    no_style = generators.ProblemSource("rl", 0, (2, 5), 5)
    assert no_style[0]["text"] == "" and no_style[0]["style"] == ""


def test_styles_and_splits_read_different_problems():
    def questions(split, levels, size, style, key="question"):
        src = generators.ProblemSource(split, 0, levels, size, style)
        return {src[i][key] for i in range(size)}

    uids = {style: questions("train", (1,), 2000, style, "uid") for style in generators.STYLES}
    assert len(uids["tinygsm"] & uids["omi1"]) < 200  # level-1 problems repeat only by chance
    assert not questions("train", (3,), 3000, "omi1") & questions("validation", (3,), 300, "omi1")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(split="dev"), "split"),
        (dict(style="latex"), "style"),
        (dict(levels=(0,)), "levels"),
        (dict(levels=()), "levels"),
        (dict(size=-1), "size"),
    ],
)
def test_problem_source_rejects_bad_arguments(kwargs, match):
    args = dict(split="train", seed=0, levels=(1,), size=10, style=None) | kwargs
    with pytest.raises(ValueError, match=match):
        generators.ProblemSource(**args)


def test_mixture_presets():
    assert set(mixtures.MIXTURES) == {
        "tg",
        "tg_omi1",
        "tg_2xomi1",
        "tg_4xomi1",
        "tg_8xomi1",
        "tg_omi2",
        "tg_omi1_omi2",
        "omi1_omi2",
    }
    assert mixtures.get_mixture("tg_4xomi1") == {"tinygsm": 1.0, "omi1": 4.0}
    assert mixtures.get_mixture("tg_8xomi1")["omi1"] == 8.0
    assert mixtures.mixture_shares("tg_4xomi1") == {"tinygsm": 0.2, "omi1": 0.8}
    assert all(set(r) <= set(generators.STYLES) for r in mixtures.MIXTURES.values())
    with pytest.raises(ValueError) as err:
        mixtures.get_mixture("tg_3xomi1")
    assert "tg_3xomi1" in str(err.value) and "tg_omi1_omi2" in str(err.value)
    assert "\n" not in str(err.value)


def test_real_loaders_parse_the_shared_data(shared_data):
    train, test = real.load_gsm8k("train"), real.load_gsm8k("test")
    assert (len(train), len(test)) == (7473, 1319)
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", r["answer"]) for r in train + test)
    raw = json.loads((shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[0])
    assert test[0]["question"] == raw["question"]
    assert test[0]["answer"] == raw["answer"].split("####")[-1].strip().replace(",", "")
    math500 = real.load_math500()
    assert len(math500) == 500 and all(r["question"] and r["answer"] for r in math500)
    assert {r["level"] for r in math500} == {1, 2, 3, 4, 5}
    aime24, aime25, aime_all = (real.load_aime(n) for n in real.AIME_SETS)
    assert (len(aime24), len(aime25)) == (30, 30) and len(aime_all) == 949 + 30
    assert all(0 <= int(r["answer"]) <= 999 for r in aime24 + aime25)
    assert sum(r["answer_raw"] != r["answer"] for r in aime24) == 7  # "025" -> "25"


def test_real_loader_errors(tmp_path, monkeypatch):
    monkeypatch.setenv(files.DATA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(MissingFileError) as err:
        files.data_dir()
    assert files.DATA_ENV in str(err.value) and "nowhere" in str(err.value)
    monkeypatch.setenv(files.DATA_ENV, str(tmp_path))
    with pytest.raises(MissingFileError) as err:
        real.load_math500()
    assert str(tmp_path / "math500" / "test.jsonl") in str(err.value)
    assert files.DATA_ENV in str(err.value)
    (tmp_path / "gsm8k").mkdir()
    good = json.dumps({"question": "q?", "answer": "1 + 1 = 2\n#### 1,234"})
    (tmp_path / "gsm8k" / "test.jsonl").write_text(f"{good}\n\n{good}\n{{oops\n")
    with pytest.raises(ValueError) as err:
        real.load_gsm8k("test")
    assert str(tmp_path / "gsm8k" / "test.jsonl") in str(err.value) and ":4:" in str(err.value)
    (tmp_path / "gsm8k" / "test.jsonl").write_text(f"{good}\n")
    assert real.load_gsm8k("test")[0]["answer"] == "1234"
    with pytest.raises(ValueError, match="split"):
        real.load_gsm8k("dev")
    with pytest.raises(ValueError, match="aime24"):
        real.load_aime("aime23")


def test_download_cli_works_offline(capsys):
    with pytest.raises(SystemExit) as exit_info:
        download.main(["--help"])
    assert exit_info.value.code == 0
    assert download.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(spec.repo_id in listed for spec in download.DATASETS.values())
    assert download.main(["--dataset", "omi2", "--out", "/tmp/none", "--dry-run"]) == 0
    assert "nvidia/OpenMathInstruct-2" in capsys.readouterr().out
    assert not os.path.exists("/tmp/none/omi2.jsonl")
    assert set(download.DATASETS) == set(generators.STYLES)

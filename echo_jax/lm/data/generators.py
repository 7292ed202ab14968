"""Seeded GSM8K-like word problems with exact integer answers, rendered in the study's three styles.

The study (STUDIES.md A) pretrains on instruction sets whose solutions differ only in *style*; here
the same kind of problem is written as a TinyGSM Python function, an OpenMathInstruct-1
text-with-code answer, or an OpenMathInstruct-2 natural-language answer, so every generated output
can be traced to its style. Problems come from `templates.TEMPLATES`; `level` = number of arithmetic
steps (1..6). Operands stay small and every intermediate result is an integer between 2 and the
template's cap, so that a tiny byte-level model can learn the arithmetic.

Splits are decided by a hash of the problem's canonical content (template, operations, numbers; not
the names), so a problem and its renamings always land in the same split.
"""

import dataclasses
import hashlib
import random
import threading
from collections.abc import Sequence

from echo_jax.core.config import ConfigError
from echo_jax.lm.data import templates as tpl

STYLES: tuple[str, ...] = ("tinygsm", "omi1", "omi2")
SPLITS: tuple[str, ...] = ("train", "rl", "validation", "test")
LEVELS: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
_SPLIT_BOUNDS = ((0.85, "train"), (0.90, "rl"), (0.95, "validation"), (1.0, "test"))
_PERCENTS = (10, 20, 25, 30, 40, 50, 60, 75, 80, 90)
_FRACTIONS = {
    (1, 2): "half",
    (1, 3): "a third",
    (2, 3): "two thirds",
    (1, 4): "a quarter",
    (3, 4): "three quarters",
    (1, 5): "a fifth",
    (2, 5): "two fifths",
}
_MALE = (
    "Tom",
    "Ben",
    "Sam",
    "Jack",
    "Leo",
    "Omar",
    "Ravi",
    "Noah",
    "Ivan",
    "Carlos",
    "Liam",
    "Kenji",
    "Ethan",
    "Hugo",
    "Felix",
)
_FEMALE = (
    "Anna",
    "Maria",
    "Lily",
    "Emma",
    "Sofia",
    "Mia",
    "Chloe",
    "Grace",
    "Zoe",
    "Nina",
    "Aisha",
    "Rosa",
    "Julia",
    "Amara",
    "Priya",
)
_NAMES = tuple((n, "m") for n in _MALE) + tuple((n, "f") for n in _FEMALE)
_PRONOUNS = {"m": ("He", "he", "him", "his", "His"), "f": ("She", "she", "her", "her", "Her")}
_OMI1_OPENERS = (
    "Let's solve this problem using Python code.",
    "Let's use Python to solve this problem.",
    "Let's compute the answer with Python code.",
)
_OMI2_OPENERS = (
    "Let's break down the problem step by step.",
    "Let's solve this step by step.",
    "We work through the problem one step at a time.",
)
_SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "//"}
_MATH_SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


@dataclasses.dataclass(frozen=True)
class Step:
    """One line of the computation: a given (`expr` empty) or `var = expr` over earlier vars."""

    kind: str
    var: str
    value: int
    expr: str = ""
    say: str = ""


@dataclasses.dataclass(frozen=True)
class Problem:
    """A word problem and its structured solution.

    `key` is the canonical content (template, operations, numbers) that decides the split;
    `conclusion` is the closing statement with an `{ans}` slot; `variant` picks the opening line.
    """

    uid: str
    template: str
    level: int
    question: str
    answer: int
    steps: tuple[Step, ...]
    key: str
    conclusion: str
    variant: int


def stable_hash(*parts: object) -> int:
    """A stable 64-bit hash (Python's `hash` is salted per process)."""
    data = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _pick_operand(op: tpl.Op, x: int, cap: int, rng: random.Random) -> int | tuple[int, int] | None:
    """An operand that keeps the result an integer in [2, cap], or None if there is none."""
    if op.kind == "add":
        hi = min(op.hi, cap - x)
        return rng.randint(op.lo, hi) if hi >= op.lo else None
    if op.kind == "sub":
        hi = min(op.hi, x - 2)
        return rng.randint(op.lo, hi) if hi >= op.lo else None
    if op.kind == "mul":
        hi = min(op.hi, cap // max(x, 1))
        return rng.randint(op.lo, hi) if hi >= op.lo else None
    if op.kind == "div":
        options = [d for d in range(op.lo, op.hi + 1) if x % d == 0]
    elif op.kind in ("pct", "pct_off"):
        options = [p for p in _PERCENTS if x * p % 100 == 0]
    else:
        options = [f for f in _FRACTIONS if x % f[1] == 0]
    return rng.choice(options) if options else None


def _apply(kind: str, x: int, k: int | tuple[int, int]) -> int:
    if kind == "add":
        return x + k
    if kind == "sub":
        return x - k
    if kind == "mul":
        return x * k
    if kind == "div":
        return x // k
    if kind == "pct":
        return x * k // 100
    if kind == "pct_off":
        return x * (100 - k) // 100
    return x * k[0] // k[1]


def _code_and_math(kind: str, cur: str, arg: str, x: int, k, r: int) -> tuple[str, str]:
    """The Python expression (integer arithmetic, so it prints integers) and its prose form."""
    if kind in _SYMBOL:
        return f"{cur} {_SYMBOL[kind]} {arg}", f"{x} {_MATH_SYMBOL[kind]} {k} = {r}"
    if kind == "pct":
        return f"{cur} * {arg} // 100", f"{x} * {k} / 100 = {r}"
    if kind == "pct_off":
        return f"{cur} * (100 - {arg}) // 100", f"{x} * (100 - {k}) / 100 = {r}"
    return f"{cur} * {k[0]} // {k[1]}", f"{x} * {k[0]} / {k[1]} = {r}"


def _sample_ops(t: tpl.Template, level: int, rng: random.Random):
    """Draws a start value and `level` (op index, op, operand, value) steps; -1 is the head op."""
    x = start = rng.randint(t.lo, t.hi)
    chosen, used, prev = [], set(), None
    for i in range(level):
        if i == 0 and t.head is not None:
            pool = [(-1, t.head)]
        else:
            pool = [
                (j, op)
                for j, op in enumerate(t.ops)
                if (i == level - 1 or not op.last) and not (op.once and j in used)
            ]
            rng.shuffle(pool)
            pool.sort(key=lambda jo: (jo[0] in used, jo[0] == prev))  # prefer fresh operations
        for j, op in pool:  # noqa: B007  (j is the chosen operation after the loop)
            k = _pick_operand(op, x, t.cap, rng)
            if k is not None and _apply(op.kind, x, k) >= 2:
                break
        else:
            return None
        value = _apply(op.kind, x, k)
        chosen.append((j, op, k, value))
        used.add(j)
        prev, x = j, value
    return start, chosen


def _skeleton(seed: int, index: int, level: int):
    """The random choices of a problem (template, numbers, names), before any text is rendered."""
    if level not in LEVELS:
        raise ConfigError(f"level must be one of {LEVELS}, got {level}")
    rng = random.Random(stable_hash("problem", seed, index, level))
    while True:  # rarely more than one try: a draw fails only when no op fits the numbers
        t = rng.choice(tpl.TEMPLATES)
        drawn = _sample_ops(t, level, rng)
        if drawn is not None:
            break
    start, ops = drawn
    people = rng.sample(_NAMES, level + 2)
    variant = rng.randrange(len(_OMI1_OPENERS))
    key = t.name + "|" + str(start) + "|" + ";".join(f"{j}:{k}" for j, _, k, _ in ops)
    return t, start, ops, people, variant, key


def _split_of_key(key: str) -> str:
    u = stable_hash("split", key) / 2.0**64
    return next(name for bound, name in _SPLIT_BOUNDS if u < bound)


def make_problem(seed: int, index: int, level: int) -> Problem:
    """The deterministic problem number `index` of stream `seed` with `level` arithmetic steps."""
    t, x, ops, people, variant, key = _skeleton(seed, index, level)
    (name, sex), (friend, _) = people[0], people[1]
    he_cap, he, him, his, his_cap = _PRONOUNS[sex]
    fields = dict(
        name=name,
        friend=friend,
        He=he_cap,
        he=he,
        him=him,
        his=his,
        His=his_cap,
        name_l=name.lower(),
        x=x,
        prev=name,
        new=name,
        prev_l=name.lower(),
    )
    cur = t.var.format(**fields)
    steps = [Step("given", cur, x)]
    sentences = [t.start.format(**fields)]
    taken = {cur, "result"}

    def fresh(pattern: str) -> str:
        base = pattern.format(**fields)
        var, n = base, 1
        while var in taken:
            n += 1
            var = f"{base}_{n}"
        taken.add(var)
        return var

    for i, (_, op, k, value) in enumerate(ops):
        if t.chain:
            new = people[i + 2][0]
            prev = fields["new"]
            fields.update(prev=prev, prev_l=prev.lower(), new=new, new_l=new.lower())
        words = _FRACTIONS[k] if op.kind == "frac" else k
        fields.update(k=words, x=x, r=value)
        sentences.append(op.text.format(**fields))
        arg = ""
        if op.kind != "frac":
            arg = fresh(op.arg)
            steps.append(Step("given", arg, k))
        expr, fields["math"] = _code_and_math(op.kind, cur, arg, x, k, value)
        cur = fresh(op.out)
        steps.append(Step(op.kind, cur, value, expr, op.say.format(**fields)))
        x = value
    last = ops[-1][1]
    question = " ".join(sentences + [(last.ask or t.ask).format(**fields)])
    conclusion = (last.tell or t.tell).format(**{**fields, "ans": "{ans}"})
    uid = f"{t.name}-{stable_hash('uid', key, question):016x}"
    return Problem(uid, t.name, level, question, ops[-1][3], tuple(steps), key, conclusion, variant)


def split_of(problem: Problem) -> str:
    """The split ("train" 85 %, "rl" 5 %, "validation" 5 %, "test" 5 %) of a problem's content."""
    return _split_of_key(problem.key)


def _tinygsm(p: Problem) -> str:
    givens = [f"    {s.var} = {s.value}" for s in p.steps if s.kind == "given"]
    calcs = [f"    {s.var} = {s.expr}" for s in p.steps if s.kind != "given"]
    head = ["def simple_math_problem() -> int:", '    """', f"    {p.question}", '    """']
    tail = [f"    result = {p.steps[-1].var}", "    return result"]
    return "\n".join(head + givens + calcs + tail)


def ends_in_print(p: Problem, omi1_print_share: float) -> bool:
    """Whether `p`'s OMI1 code block ends in `print(answer)` rather than a bare expression (the
    notebook style of the study's own OMI1 example, which its grader's last-line `eval` reads;
    `print(...)` evaluates to None there): a stable draw per problem with this probability."""
    return stable_hash("omi1_print", p.key) % 10_000 < omi1_print_share * 10_000


def _omi1(p: Problem, omi1_print_share: float = 0.0) -> str:
    last = p.steps[-1].var
    code = [f"{s.var} = {s.expr or s.value}" for s in p.steps]
    code.append(f"print({last})" if ends_in_print(p, omi1_print_share) else last)
    closing = "Thus " + p.conclusion.replace("{ans}", f"\\boxed{{{p.answer}}}") + "."
    return "\n".join(
        [
            _OMI1_OPENERS[p.variant],
            "<llm-code>",
            *code,
            "</llm-code>",
            "<llm-code-output>",
            str(p.answer),
            "</llm-code-output>",
            closing,
        ]
    )


def _omi2(p: Problem) -> str:
    says = [s.say for s in p.steps if s.kind != "given"]
    return "\n".join([_OMI2_OPENERS[p.variant], *says, f"So the answer is \\boxed{{{p.answer}}}."])


_RENDERERS = {"tinygsm": _tinygsm, "omi1": _omi1, "omi2": _omi2}


def render_solution(problem: Problem, style: str, omi1_print_share: float = 0.0) -> str:
    """The solution text of `problem` as the public dataset of `style` writes it; OMI1 code ends
    in `print(...)` for a share `omi1_print_share` of problems (`ends_in_print`)."""
    if style not in _RENDERERS:
        raise ConfigError(f"unknown style {style!r}; valid styles: {STYLES}")
    if style == "omi1":
        return _omi1(problem, omi1_print_share)
    return _RENDERERS[style](problem)


def format_example(problem: Problem, style: str, omi1_print_share: float = 0.0) -> str:
    """`question\\n\\nsolution`, as the study stores pretraining examples (no chat template)."""
    return problem.question + "\n\n" + render_solution(problem, style, omi1_print_share)


class ProblemSource:
    """Random-access problems of one split, for grain (`MapDataset.source`) and seqio.

    Candidate indices are scanned in order and kept when their problem hashes into `split`; the
    kept indices are found lazily, in chunks, so building costs only what is read. Each style reads
    its own index stream, so the three styles hold different problems, as in the study's datasets.
    A lock keeps the scan ordered when grain reads from several threads.
    """

    _CHUNK = 4096

    def __init__(
        self,
        split: str,
        seed: int,
        levels: Sequence[int],
        size: int,
        style: str | None = None,
        omi1_print_share: float = 0.0,
    ):
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; valid splits: {SPLITS}")
        if style is not None and style not in STYLES:
            raise ConfigError(f"unknown style {style!r}; valid styles: {STYLES}")
        if not levels or any(lv not in LEVELS for lv in levels):
            raise ConfigError(f"levels must be a non-empty subset of {LEVELS}, got {tuple(levels)}")
        if size < 0:
            raise ConfigError(f"size must be >= 0, got {size}")
        self.split, self.seed, self.style, self._size = split, seed, style, size
        self.omi1_print_share = omi1_print_share
        self.levels = tuple(levels)
        self._offset = (STYLES.index(style) + 1) << 40 if style else 0
        self._kept: list[tuple[int, int]] = []
        self._next = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _extend(self, n: int) -> None:
        if len(self._kept) >= n:
            return
        with self._lock:
            self._extend_locked(n)

    def _extend_locked(self, n: int) -> None:
        while len(self._kept) < n:
            for _ in range(self._CHUNK):
                index = self._offset + self._next
                self._next += 1
                level = self.levels[stable_hash("level", self.seed, index) % len(self.levels)]
                if _split_of_key(_skeleton(self.seed, index, level)[-1]) == self.split:
                    self._kept.append((index, level))

    def problem(self, i: int) -> Problem:
        """The i-th problem of this source."""
        if not -self._size <= i < self._size:
            raise IndexError(f"index {i} out of range for a source of size {self._size}")
        i %= self._size
        self._extend(i + 1)
        return make_problem(self.seed, *self._kept[i])

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, i: int) -> dict:
        p = self.problem(i)
        return {
            "uid": p.uid,
            "question": p.question,
            "answer": p.answer,
            "level": p.level,
            "template": p.template,
            "style": self.style or "",
            "text": format_example(p, self.style, self.omi1_print_share) if self.style else "",
        }

    def __repr__(self) -> str:
        return (
            f"ProblemSource(split={self.split!r}, seed={self.seed}, levels={self.levels}, "
            f"size={self._size}, style={self.style!r})"
        )

"""Answer extraction from completions, gold answers from data fields, and answer normalisation.

:func:`extract_answer` takes the content of the **last complete** ``\\boxed{...}`` of a completion (balanced braces;
``\\boxed 5``; ``\\fbox``/``\\framebox``); only that box is handed to math-verify, which avoids its "two boxes close
together parse as a set" pitfall. Fallbacks: "the (final) answer is X" / "Answer: X", then the last number. The
source of each answer is recorded so callers can log the fallback rate. :func:`gold_answer` turns a dataset field
into a gold string (``boxed`` for MATH solutions, ``gsm8k`` for ``#### N``, ``plain`` for answer fields).
"""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import dataclass

from zerosiam_llm.errors import UserInputError

EXTRACTION_SOURCES = ("boxed", "answer_is", "last_number", "none")
GOLD_STYLES = ("boxed", "gsm8k", "plain")

# ---------------------------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Extraction:
    """An answer pulled out of a completion. ``source`` is one of ``EXTRACTION_SOURCES``; ``answer`` is None only
    when ``source == "none"``."""

    answer: str | None
    source: str


# `\boxed`, `\fbox` and `\framebox` (MATH/AIME solutions use the last two); the lookahead rejects longer command
# names such as `\boxedsomething`.
_BOX_RE = re.compile(r"\\(?:boxed|fbox|framebox)(?![A-Za-z])")
# "The final answer is X", "Final Answer: X", "the answer is: X", "Answer: X". The last match in the text wins.
_ANSWER_IS_RE = re.compile(r"\b(?:final\s+answer|answer)\s*(?:is\s*:?|:)[ \t]*", re.IGNORECASE)
_INLINE_MATH_RE = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
# Numbers: optional minus (not after a word character or closing bracket, so "5-3" yields 3 and not -3),
# thousands separators only in proper groups of three, decimals, and simple fractions such as 3/4.
_NUMBER_RE = re.compile(r"(?:(?<![\w)\]}])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?")


def _balanced_group(text: str, start: int) -> int | None:
    """Index just past the ``}`` closing the ``{`` at ``text[start]``, or None if it never closes (truncation).

    Escaped braces ``\\{`` and ``\\}`` are literal characters in LaTeX and are not counted, so
    ``\\boxed{\\left\\{1\\right.}`` still closes.
    """
    depth = 0
    i = start
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character (`\{`, `\}`, `\\`)
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _box_content(text: str, match: re.Match[str]) -> str | None:
    """Content of one box command, or None if it is unclosed, empty or malformed."""
    i = match.end()
    n = len(text)
    j = i
    while j < n and text[j] in " \t":
        j += 1
    if j < n and text[j] == "{":
        end = _balanced_group(text, j)
        if end is None:
            return None
        content = text[j + 1 : end - 1].strip()
        return content or None
    if j > i and j < n:
        # `\boxed 5` (no braces): the argument is the next token, up to whitespace or the closing `$`.
        token = re.match(r"[^\s$]+", text[j:])
        if token:
            return token.group(0).rstrip(".,;") or None
    return None


def _last_boxed(text: str) -> str | None:
    """Content of the last complete box. An unclosed last box (truncated output) or an empty ``\\boxed{}`` (the
    instruction echoed back) is skipped in favour of an earlier complete one."""
    matches = list(_BOX_RE.finditer(text))
    for match in reversed(matches):
        content = _box_content(text, match)
        if content is not None:
            return content
    return None


def has_boxed(text: str) -> bool:
    """True if the text holds at least one complete, non-empty ``\\boxed{}`` (or ``\\fbox``/``\\boxed 5``)."""
    return _last_boxed(text) is not None


def _clean_answer_is(rest: str) -> str | None:
    """Trim the text after "the answer is" down to the answer itself."""
    line = rest.split("\n", 1)[0].strip()
    if not line:
        return None
    boxed = _last_boxed(line)
    if boxed is not None:
        return boxed
    math_seg = _INLINE_MATH_RE.search(line)
    if math_seg is not None and line[: math_seg.start()].strip(" *:") == "":
        # "The answer is $\frac{1}{2}$." -> the first math segment, when the line starts with it.
        return next(g for g in math_seg.groups() if g is not None).strip() or None
    # Cut at the end of the sentence: ". " followed by more text; a decimal point (3.5) is not followed by a space.
    line = re.split(r"\.\s", line, maxsplit=1)[0]
    line = line.strip(" \t*$").rstrip(".;,").strip(" \t*$")  # markdown bold **42**, stray $
    # "1,234 dollars", "$18 per day", "12 square units": the number without its unit words
    with_unit = re.fullmatch(rf"\$?\s*({_NUMBER_RE.pattern})\s+[A-Za-z][A-Za-z ]*", line)
    if with_unit is not None:
        return re.sub(r"[,\s]", "", with_unit.group(1))
    return line or None


def _last_number(text: str) -> str | None:
    matches = deque(_NUMBER_RE.finditer(text), maxlen=1)  # keeps only the last match
    if not matches:
        return None
    return re.sub(r"[,\s]", "", matches[0].group(0))


def extract_answer(text: str) -> Extraction:
    """The final answer of a completion, and where it came from.

    Order: the last complete ``\\boxed{}`` (``"boxed"``); "the (final) answer is X" / "Final Answer: X" /
    "Answer: X", last occurrence (``"answer_is"``); the last number, with thousands separators removed
    (``"last_number"``); else ``Extraction(None, "none")``.
    """
    if not isinstance(text, str):
        raise UserInputError(f"extract_answer expects a string, got {type(text).__name__}")
    boxed = _last_boxed(text)
    if boxed is not None:
        return Extraction(boxed, "boxed")
    for match in reversed(list(_ANSWER_IS_RE.finditer(text))):
        answer = _clean_answer_is(text[match.end() :])
        if answer is not None:
            return Extraction(answer, "answer_is")
    number = _last_number(text)
    if number is not None:
        return Extraction(number, "last_number")
    return Extraction(None, "none")


# ---------------------------------------------------------------------------------------------------------------
# Gold answers and light normalisation
# ---------------------------------------------------------------------------------------------------------------

_INTEGRAL_FLOAT_RE = re.compile(r"^([+-]?\d+)\.0*$")


def _plain_number(value: str) -> str:
    """'3.0' -> '3', '27.00' -> '27'; anything else unchanged (AMC23 golds are floats in the JSON)."""
    match = _INTEGRAL_FLOAT_RE.match(value)
    if match:
        return str(int(match.group(1)))
    return value


def gold_answer(raw: str | int | float, style: str) -> str:
    """The gold answer string from a dataset field.

    Styles: ``"boxed"`` -- the last complete ``\\boxed{}`` of a MATH-style solution; ``"gsm8k"`` -- the text after
    the last ``####`` with commas removed; ``"plain"`` -- the value itself (stripped), with integral floats such as
    ``3.0`` written as ``3``. Numbers (AIME25 ints, AMC23 floats) are accepted and converted to strings.
    """
    if style not in GOLD_STYLES:
        raise UserInputError(f"gold style must be one of {', '.join(GOLD_STYLES)}; got {style!r}")
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise UserInputError(f"gold answer must be a string or a number, got {type(raw).__name__}")
    if isinstance(raw, float):
        if not math.isfinite(raw):
            raise UserInputError(f"gold answer must be finite, got {raw!r}")
        text = str(int(raw)) if raw.is_integer() else repr(raw)
    else:
        text = str(raw)
    if style == "boxed":
        boxed = _last_boxed(text)
        if boxed is None:
            raise UserInputError(f"gold solution has no complete \\boxed{{}}: {text[-80:]!r}")
        return boxed
    if style == "gsm8k":
        if "####" not in text:
            raise UserInputError(f"GSM8K gold has no '####' marker: {text[-80:]!r}")
        answer = text.rsplit("####", 1)[1].strip().replace(",", "")
        if not answer:
            raise UserInputError("GSM8K gold is empty after '####'")
        return _plain_number(answer)
    answer = text.strip()
    if not answer:
        raise UserInputError("gold answer is empty")
    return _plain_number(answer)


_TEXT_WRAPPER_RE = re.compile(r"^\\(?:text|textbf|mathrm|mbox)\{")
_NORMALIZE_SUBS = (
    (re.compile(r"\\(?:left|right)(?![A-Za-z])"), ""),  # not \rightarrow
    (re.compile(r"\\[dt]frac(?![A-Za-z])"), r"\\frac"),
    (re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![A-Za-z])"), ""),
    (re.compile(r"\\%"), ""),
    (re.compile(r"\\\$"), ""),
    (re.compile(r"\\[,!;: ]"), ""),  # thin spaces: 1\,000
    (re.compile(r"\s+"), ""),
)


def normalize_answer(answer: str) -> str:
    """Light, meaning-preserving normalisation used for the grader's fast path and exact-string voting.

    Removes whitespace, ``\\left``/``\\right``, thin spaces, ``\\%``, ``\\$``, ``^\\circ``, trailing periods and a
    whole-string ``\\text{...}`` wrapper; writes ``\\dfrac``/``\\tfrac`` as ``\\frac``. Assignments such as
    ``x=5`` are deliberately kept: whether ``x=5`` equals ``5`` is math-verify's decision.
    """
    s = answer.strip()
    for _ in range(3):  # nested wrappers: \text{\textbf{5}}
        wrapped = _TEXT_WRAPPER_RE.match(s)
        if not wrapped or _balanced_group(s, wrapped.end() - 1) != len(s):
            break
        s = s[wrapped.end() : -1].strip()
    for pattern, repl in _NORMALIZE_SUBS:
        s = pattern.sub(repl, s)
    return s.rstrip(".")

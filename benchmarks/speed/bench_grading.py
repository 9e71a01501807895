"""Grading throughput: MATH-500 gold answers x 16 completions (8000 answers, mixed correct / equivalent / wrong /
unextractable) plus pathological answers, graded by the project's Grader with its per-answer deadline.

    python benchmarks/speed/bench_grading.py [--data ../shared/data/math500_test.jsonl] [--workers 2] [--rounds 3]

Completions are short texts ending in an answer, so the time measured is extraction + math-verify, the part the
grader owns. Goal: <= 60 s on 2 cores with the deadline enforced.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

PATHOLOGICAL = ["9^{9^{9^{9}}}", "10^{10^{10^{10}}}"]


def build(data: Path, per_problem: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    golds, texts = [], []
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    for row in rows:
        gold = str(row["answer"])
        for j in range(per_problem):
            kind = j % 8
            if kind in (0, 1):
                ans = gold  # correct, verbatim
            elif kind == 2:
                ans = f"{gold} " if not gold.isdigit() else f"{int(gold)}.0"  # equivalent form
            elif kind == 7:
                ans = None  # no answer at all
            else:
                ans = str(rng.randint(0, 999))  # wrong
            text = "We compute step by step." + (
                f" The final answer is $\\boxed{{{ans}}}$." if ans else " I am not sure."
            )
            golds.append(gold)
            texts.append(text)
    for bad in PATHOLOGICAL:  # answers that hang sympy: each costs at most the deadline
        golds.append("1")
        texts.append(f"So the answer is \\boxed{{{bad}}}.")
    return golds, texts


def main() -> None:
    from zerosiam_llm.grading import Grader, extract_answer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[3] / "shared/data/math500_test.jsonl"
    )
    parser.add_argument("--per_problem", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    golds, texts = build(args.data, args.per_problem, 0)
    times, stats = [], None
    for _ in range(args.rounds):
        start = time.perf_counter()
        answers = [extract_answer(t).answer for t in texts]
        with Grader(num_workers=args.workers, timeout_s=args.timeout) as grader:  # worker start-up included
            verdicts = grader.grade(golds, answers)
            stats = grader.stats.as_dict()
        times.append(time.perf_counter() - start)
    print(f"{len(texts)} answers ({len(PATHOLOGICAL)} pathological), {args.workers} workers, deadline {args.timeout}s")
    print(f"wall s per round: median {statistics.median(times):.1f}, min {min(times):.1f}, max {max(times):.1f}")
    print(f"correct {sum(verdicts)}; stats {stats}")


if __name__ == "__main__":
    main()

"""Compare evaluation runs: python evals/compare.py RUN_A RUN_B [...] [--output_dir DIR] (the first is the baseline).

Same as python evals/evaluate.py --compare RUN_A RUN_B: per benchmark, each run's headline metric, the difference
to the baseline and its paired bootstrap 95% interval over the shared problems.
"""

import sys

from zerosiam_llm.evaluation import main

if __name__ == "__main__":
    sys.exit(main(["--compare", *sys.argv[1:]]))

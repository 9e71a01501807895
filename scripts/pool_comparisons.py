"""Pool several ``--compare_methods`` outputs (e.g. the same methods over two stream orders) into one table: per
method and stream, the predictions counted together with a 95% Wilson interval.

    python scripts/pool_comparisons.py outputs/pooled outputs/cmp-seed0 outputs/cmp-seed1
"""

import sys

from zerosiam_llm.compare import pool_main
from zerosiam_llm.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(pool_main, None))

"""Stability map: methods x learning rates x seeds on the online protocol, each run classified healthy / degraded /
collapsed (see ``zerosiam_llm/experiments/stability.py`` and docs/stability.md).

    python scripts/stability_map.py --grid recipes/stability/final.yaml --data_dir ../shared/data \
        --output_dir outputs/stability
"""

import sys

from zerosiam_llm.experiments.stability import main

if __name__ == "__main__":
    sys.exit(main())

"""Adapt a model at test time with ZeroSiam (or Tent). The same command as ``zerosiam-train``.

python train.py                                   # the bundled default: SmolLM2-135M on CPU, offline
python train.py --recipe qwen-0.5b                # a bundled recipe (zerosiam_llm/recipes/, also at recipes/)
python train.py --config my.yaml                  # your own YAML
accelerate launch train.py --recipe qwen-0.5b.yaml --learning_rate 3e-4 --method tent
"""

import sys

from zerosiam_llm.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())

"""Adapt a model at test time with ZeroSiam (or Tent).

python train.py                                   # the embedded default: SmolLM2-135M on CPU, offline
python train.py --recipe qwen-0.5b.yaml           # a recipe from recipes/ (or a path)
accelerate launch train.py --recipe NAME --learning_rate 3e-4 --method tent
"""

import sys
from pathlib import Path

from zerosiam_llm.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main(recipes_dir=Path(__file__).resolve().parent / "recipes"))

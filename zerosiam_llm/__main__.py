"""``python -m zerosiam_llm [--recipe NAME | --config FILE.yaml] [--field value ...]``: the training command."""

import sys

from zerosiam_llm.cli import train_main

sys.exit(train_main())

"""Score a model, checkpoint or adapter on MATH-500, AIME24, AIME25, AMC23 and GSM8K (definitions: benchmarks.yaml).

python evals/evaluate.py --model embedded:smollm2-135m --benchmarks gsm8k --data_dir ../shared/data --limit 8 \
    --max_new_tokens 256 --output_dir outputs/eval-smollm2
python evals/evaluate.py --model Qwen/Qwen2.5-0.5B-Instruct --adapter outputs/qwen-0.5b --backend vllm \
    --benchmarks math500,aime24 --output_dir outputs/eval-qwen-0.5b-zerosiam
python evals/evaluate.py --compare outputs/eval-base outputs/eval-zerosiam
"""

import sys

from zerosiam_llm.evaluation import main

if __name__ == "__main__":
    sys.exit(main())

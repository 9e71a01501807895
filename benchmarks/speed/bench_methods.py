"""Whole online step of each label-free method against Tent with the same number of rollouts, paired in one process.

    python benchmarks/speed/bench_methods.py --batches 4                 # tent + the four RL methods, k = 4
    python benchmarks/speed/bench_methods.py --batches 4 --methods tent,zerosiam,majority-vote

Each method runs through its real trainer (``ZeroSiamTrainer`` for tent / zerosiam, ``LabelFreeTrainer`` for the RL
methods) on its own copy of the embedded SmolLM2-135M with LoRA r16, online protocol, the same stream of generated
arithmetic problems (``problems`` per batch, k sampled rollouts each at T = 1, <= ``max_new_tokens`` tokens). A step
is ``trainer.training_step`` on the batch: generation of the k rollouts, the method's rewards (RL) or monitors,
then the loss forward and backward (the optimizer step, a few ms for LoRA, is left out). Within a batch the methods
run back to back, each after ``torch.manual_seed`` with the same seed and at lr 0, so they sample from the same
weights; rollouts of fp32 generation (``rollout_dtype: model`` for Tent, as GRPO generates from the training model)
then match, and the mean completion length is printed to show it. The first batch is left out (warm-up).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from paired import print_paired


def make_trainer(method: str, k: int, problems: int, max_new_tokens: int, out: Path, num_problems: int):
    from zerosiam_llm.data import build_prompt_dataset, generate_arithmetic_problems
    from zerosiam_llm.modeling import load_model, load_tokenizer, make_lora_config, resolve_model
    from zerosiam_llm.parser import build_config
    from zerosiam_llm.trainers import trainer_class

    config = build_config("smollm2-135m-online-cpu", {
        "method": method, "num_rollouts": k, "temperature": 1.0, "stream_batch_size": problems,
        "max_completion_length": max_new_tokens, "learning_rate": 0.0, "predictor_learning_rate": 0.0,
        "rollout_dtype": "model", "base_nll_every": 0, "output_dir": str(out / method), "disable_tqdm": "true",
        "report_to": "none"})  # fmt: skip
    source = resolve_model(config.model)
    tokenizer = load_tokenizer(source)
    problems_list = generate_arithmetic_problems(num_problems, seed=0)
    dataset, _ = build_prompt_dataset(problems_list, tokenizer, config.instruction)
    lora = make_lora_config(config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
    trainer = trainer_class(config)(load_model(source), args=config, train_dataset=dataset, processing_class=tokenizer,
                                    peft_config=lora)  # fmt: skip
    trainer.current_gradient_accumulation_steps = 1  # set by train(), which a benchmark step does not call
    trainer.model.train()
    return trainer


def run(methods: list[str], k: int, problems: int, batches: int, max_new_tokens: int):
    import torch

    times: dict[str, list[float]] = {m: [] for m in methods}
    lengths: dict[str, list[float]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {m: make_trainer(m, k, problems, max_new_tokens, Path(tmp), problems * batches) for m in methods}
        loaders = {m: iter(t.get_train_dataloader()) for m, t in trainers.items()}
        for b in range(batches):
            for method, trainer in trainers.items():
                batch = next(loaders[method])
                torch.manual_seed(1000 + b)
                start = time.perf_counter()
                trainer.training_step(trainer.model, batch, None)
                times[method].append(time.perf_counter() - start)
                trainer.model.zero_grad(set_to_none=True)
                lengths[method].append(trainer._metrics["train"]["completions/mean_length"][-1])
            print(f"batch {b + 1}: " + ", ".join(f"{m} {times[m][-1]:.1f} s ({lengths[m][-1]:.0f} tok)"
                                                  for m in methods), file=sys.stderr)  # fmt: skip
    return times, lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="tent,majority-vote,semantic-vote,entropy-reward,self-certainty",
                        help="Tent first: each other method is reported against it")
    parser.add_argument("--k", type=int, default=4, help="rollouts per problem")
    parser.add_argument("--problems", type=int, default=4, help="problems per stream batch")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--skip_first", type=int, default=1, help="batches left out (warm-up)")
    args = parser.parse_args()
    methods = args.methods.split(",")
    times, lengths = run(methods, args.k, args.problems, args.batches, args.max_new_tokens)
    kept = {m: ts[args.skip_first :] for m, ts in times.items()}
    print(f"\npaired in one process: {args.batches} stream batches of {args.problems} problems x k = {args.k} sampled "
          f"rollouts (first {args.skip_first} left out), <= {args.max_new_tokens} tokens; a step = generate + "
          "rewards / monitors + loss fwd/bwd")  # fmt: skip
    print_paired(kept, "step")
    for m in methods:
        print(f"{m}: mean completion length {statistics.mean(lengths[m][args.skip_first:]):.1f} tokens")


if __name__ == "__main__":
    main()

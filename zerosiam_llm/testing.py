"""Small randomly initialised causal LMs saved as normal HF folders: for tests, benchmarks and GPU smoke checks.

The tokenizer is a byte-level BPE trained locally on arithmetic text, with a ChatML chat template, so the whole
prompt -> generate -> loss path runs offline in seconds.
"""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    lines = []
    for a in range(0, 60, 3):
        for b in range(1, 40, 7):
            lines.append(
                f"Tom has {a} apples and buys {b} more. How many apples? {a} + {b} = {a + b}. \\boxed{{{a + b}}}"
            )
            lines.append(
                f"Please reason step by step, and put your final answer within \\boxed{{}}. {a} * {b} = {a * b}"
            )
    return lines


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer (``PreTrainedTokenizerFast``) with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token=None,
        padding_side="left",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_causal_lm(
    output_dir: str | Path | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    architecture: str = "llama",
):
    """``(model, tokenizer)``: a random Llama- (or Qwen2-) shaped causal LM; saved to ``output_dir`` when given."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, Qwen2Config

    tokenizer = build_tokenizer(vocab_size)
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[architecture]
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # scale up the head so the random model has a peaked, entropy-rich distribution like a real one
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(2.0)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None
    )
    if output_dir is not None:
        output_dir = Path(output_dir)
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
    return model, tokenizer


def kill_when(cmd: list[str], env: dict[str, str], ready, timeout: float = 300.0, what: str = "the run") -> None:
    """Start ``cmd``, SIGKILL it as soon as ``ready()`` is true (polled), and wait for it: a kill at a chosen point.
    Fails if the process ends first or ``timeout`` seconds pass."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"{what} ended (or timed out) before it could be killed")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


_KILL_AFTER_CHECKPOINT = """
import os, signal, sys
from transformers import TrainerCallback
from zerosiam_llm.trainers import base as run_trainer

class KillAfterCheckpoint(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == int(os.environ["ZEROSIAM_TEST_KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)

train = run_trainer.RunTrainerMixin.train
def train_then_kill(self, *args, **kwargs):
    self.add_callback(KillAfterCheckpoint())  # the last callback: every other on_save has run
    return train(self, *args, **kwargs)
run_trainer.RunTrainerMixin.train = train_then_kill
from zerosiam_llm.cli import train_main
sys.exit(train_main(sys.argv[1:]))
"""


def run_killed_after_checkpoint(argv: list[str], env: dict[str, str], step: int, timeout: float = 600.0) -> None:
    """Run the training command line ``argv`` in a child process that SIGKILLs itself once ``checkpoint-<step>`` is
    completely written (after every ``on_save``), before the next step starts: a kill at a fixed point of the run,
    whatever the machine's load (a file-polling kill lands anywhere in the save or after it). Fails if the child
    ends any other way."""
    import signal
    import subprocess
    import sys

    child_env = {**env, "ZEROSIAM_TEST_KILL_AT": str(step)}
    proc = subprocess.run([sys.executable, "-c", _KILL_AFTER_CHECKPOINT, *map(str, argv)], env=child_env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    if proc.returncode != -signal.SIGKILL:
        raise AssertionError(f"the run ended with {proc.returncode} before checkpoint-{step}: {proc.stderr[-2000:]}")


def direct_trainer(model_dir: str | Path, out: str | Path, **overrides):
    """The trainer the command line would build for ``smollm2-135m-cpu`` on a model folder (ZeroSiamTrainer or, for an
    RL method, LabelFreeTrainer), on 8 generated problems without gold answers: for tests that drive its hooks."""
    from zerosiam_llm.data import build_prompt_dataset, load_problems
    from zerosiam_llm.methods import get_method
    from zerosiam_llm.modeling import load_model, load_tokenizer, make_lora_config
    from zerosiam_llm.parser import build_config

    config = build_config("smollm2-135m-cpu", {
        "model": str(model_dir), "output_dir": str(out), "max_completion_length": 12, "max_steps": 1,
        "answer_field": "null", **overrides})  # fmt: skip
    tokenizer = load_tokenizer(str(model_dir))
    problems = load_problems(config.dataset, question_field=config.question_field, limit=8, seed=0)
    dataset, _ = build_prompt_dataset(problems, tokenizer, config.instruction)
    lora = make_lora_config(config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
    trainer_class = get_method(config.method).trainer_class
    return trainer_class(load_model(str(model_dir)), args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora)  # fmt: skip

"""The trainers against TRL's: every hook LabelFreeTrainer overrides keeps GRPOTrainer's signature, the generation
hooks of both trainers keep their parents' return contract, the lists of overrides are complete, and the TRL private
state the project reads (through ``trainers/trl_private.py`` only) still exists. The rewards themselves are tested
in test_rewards.py."""

import ast
import inspect
from pathlib import Path

import pytest
from trl import DistillationTrainer, GRPOTrainer

from zerosiam_llm.trainers import LabelFreeTrainer, ZeroSiamTrainer
from zerosiam_llm.trainers.base import RunTrainerMixin

PACKAGE = Path(__file__).resolve().parents[1] / "zerosiam_llm"
# the GRPOTrainer hooks LabelFreeTrainer (or the shared mixin) overrides: a new override must be listed here
OVERRIDDEN = ("_generate", "_generate_and_score_completions", "_generate_single_turn",
              "create_model_card", "get_train_dataloader")  # fmt: skip
LEADING = {"train": ("resume_from_checkpoint",)}  # overridden as (self, these, **kwargs): the parent's must lead so


def _parameters(fn) -> list[tuple[str, object]]:
    return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]


def _overrides(cls: type, parent: type) -> set[str]:
    own = set(vars(cls)) | set(vars(RunTrainerMixin))
    return {n for n in own if not n.startswith("__") and callable(getattr(parent, n, None))}


def test_the_list_of_overridden_hooks_is_complete():
    assert _overrides(LabelFreeTrainer, GRPOTrainer) == set(OVERRIDDEN) | set(LEADING)


@pytest.mark.parametrize("parent", [GRPOTrainer, DistillationTrainer])
def test_hooks_overridden_with_kwargs_keep_the_leading_parameters(parent):
    for name, leading in LEADING.items():
        assert tuple(p for p, _ in _parameters(getattr(parent, name))[1 : 1 + len(leading)]) == leading


@pytest.mark.parametrize("name", OVERRIDDEN)
def test_overridden_hooks_keep_their_signatures(name):
    parent = getattr(GRPOTrainer, name, None)
    assert parent is not None, f"GRPOTrainer.{name} is gone: LabelFreeTrainer.{name} would never be called"
    ours = _parameters(getattr(LabelFreeTrainer, name))
    if [kind for _, kind in ours] == [inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.VAR_POSITIONAL,
                                      inspect.Parameter.VAR_KEYWORD]:  # fmt: skip
        return  # the mixin's pass-through (self, *args, **kwargs): both parents' signatures, whatever they are
    assert ours == _parameters(parent), f"{name} changed its signature"


def test_the_entropy_trainers_list_is_complete_too():
    from test_trainers_entropy import CALLED
    from test_trainers_entropy import OVERRIDDEN as ENTROPY_OVERRIDDEN

    listed = set(ENTROPY_OVERRIDDEN) | ({"train"} & set(CALLED))
    assert _overrides(ZeroSiamTrainer, DistillationTrainer) == listed


def test_trl_private_state_is_touched_in_one_module_only():
    """Outside trainers/trl_private.py no module reads or writes TRL's private trainer attributes."""
    private = {"_metrics", "_buffered_inputs", "_current_train_step_time", "_step", "_iter_named_params"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "trl_private.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in private:
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} .{node.attr}")
    assert not offenders, offenders


@pytest.mark.parametrize("method", ["majority-vote", "zerosiam"])
def test_the_private_state_trl_private_uses_exists(tiny_model_dir, tmp_path, method):
    from zerosiam_llm.testing import direct_trainer
    from zerosiam_llm.trainers import trl_private

    overrides = {"num_rollouts": 2, "per_device_train_batch_size": 4} if method != "zerosiam" else {}
    trainer = direct_trainer(tiny_model_dir, tmp_path, method=method, **overrides)
    trl_private.record_metric(trainer, "probe", 1.0)
    assert trl_private.metric_values(trainer, "probe") == [1.0]
    trl_private.drop_last_metric(trainer, "probe")
    assert trl_private.generation_step(trainer) == 0
    assert trl_private.buffered_generation(trainer) is None
    trl_private.add_step_time(trainer, 0.5, logged=False)
    assert trainer._current_train_step_time >= 0.5
    trl_private.reset_generation(trainer)
    trl_private.clear_metrics(trainer)
    from trl.generation.vllm_generation import VLLMGeneration

    assert [p for p, _ in _parameters(VLLMGeneration._iter_named_params)] == ["self"]


@pytest.mark.parametrize("method", ["majority-vote", "self-certainty", "zerosiam"])
def test_overridden_generation_hooks_return_what_their_parents_return(tiny_model_dir, tmp_path, method):
    """The return contract: each trainer's _generate_and_score_completions (and GRPO's _generate) gives TRL's own
    keys and shapes on the same batch, so TRL's loss and logging read it unchanged; the additions are records only."""
    from zerosiam_llm.testing import direct_trainer

    rl = method != "zerosiam"
    overrides = {"num_rollouts": 2, "per_device_train_batch_size": 4} if rl else {}
    trainer = direct_trainer(tiny_model_dir, tmp_path, method=method, **overrides)
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    parent = GRPOTrainer if rl else DistillationTrainer
    ours = trainer._generate_and_score_completions(batch)
    theirs = parent._generate_and_score_completions(trainer, batch)
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        if hasattr(value, "shape"):
            assert ours[key].shape == value.shape and ours[key].dtype == value.dtype, key
    if rl:
        prompts = [x["prompt"] for x in batch]
        assert len(trainer._generate(prompts)) == len(GRPOTrainer._generate(trainer, prompts))

"""ZeroSiamTrainer on a tiny random model (fast) and the real embedded SmolLM2 through train.py (slow)."""

import inspect
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from trl import DistillationTrainer

from zerosiam_llm.cli import train_main
from zerosiam_llm.files import read_jsonl
from zerosiam_llm.zerosiam_trainer import ZeroSiamTrainer

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"


def tiny_args(model_dir, out, *extra):
    return [
        "--recipe", "smollm2-135m-cpu", "--model", str(model_dir), "--output_dir", str(out),
        "--max_completion_length", "12", "--num_problems", "16", "--max_steps", "2", "--save_steps", "2",
        "--answer_field", "null", *map(str, extra),
    ]  # fmt: skip


def run(argv):
    return train_main(argv)


def adapter_state(out):
    return load_file(str(Path(out) / "adapter_model.safetensors"))


def test_train_writes_adapter_predictor_metrics_and_card(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert run(tiny_args(tiny_model_dir, out)) == 0
    for name in ("adapter_model.safetensors", "adapter_config.json", "zerosiam_predictor.safetensors",
                 "zerosiam_predictor.json", "metrics.jsonl", "samples.jsonl", "resolved_config.yaml", "README.md",
                 "summary.json"):  # fmt: skip
        assert (out / name).is_file(), name
    assert not any("predictor" in k for k in adapter_state(out))
    metrics = [m for m in read_jsonl(out / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in metrics] == [1, 2]
    for key in ("zerosiam/entropy_target", "zerosiam/kl_target_online", "grad_norm/lora", "grad_norm/predictor"):
        assert key in metrics[0]
    assert metrics[0]["zerosiam/kl_target_online"] == 0.0  # P = I at step 1
    assert metrics[1]["zerosiam/predictor_deviation"] > 0
    samples = read_jsonl(out / "samples.jsonl")
    assert len(samples) == 16 and {s["step"] for s in samples} == {1, 2}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["entropy_target_first"] > 0
    from zerosiam_llm.modeling import load_model

    model = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), str(out))
    assert any("lora_" in n for n, _ in model.named_parameters())


def test_rollouts_from_the_merged_bf16_copy(tiny_model_dir, tmp_path, monkeypatch):
    """auto picks the bf16 copy on a CPU with native bf16 (else the model itself); after training the copy holds the
    trained LoRA merged; an explicit bfloat16 is honoured whatever the CPU."""
    from zerosiam_llm import zerosiam_trainer as trainer_module

    seen = {}
    real = trainer_module.ZeroSiamTrainer._generate_single_turn

    def spy(self, *args, **kwargs):
        seen.setdefault("dtypes", []).append(None if self._rollout_copy is None else self._rollout_copy.dtype)
        result = real(self, *args, **kwargs)
        seen["trainer"] = self
        return result

    monkeypatch.setattr(trainer_module.ZeroSiamTrainer, "_generate_single_turn", spy)
    monkeypatch.setattr(trainer_module, "cpu_supports_bf16", lambda: True)
    assert run(tiny_args(tiny_model_dir, tmp_path / "bf16")) == 0
    assert seen["dtypes"] == [torch.bfloat16, torch.bfloat16]
    trainer = seen["trainer"]
    trainer._rollout_copy.sync()
    for lora, linear in trainer._rollout_copy._pairs:
        delta = lora.get_delta_weight("default")
        assert delta.abs().max() > 0  # trained
        assert torch.equal(linear.weight, (lora.base_layer.weight + delta).bfloat16())
    monkeypatch.setattr(trainer_module, "cpu_supports_bf16", lambda: False)
    seen.clear()
    assert run(tiny_args(tiny_model_dir, tmp_path / "fp32")) == 0
    assert seen["dtypes"] == [None, None]
    assert (tmp_path / "fp32" / "adapter_model.safetensors").is_file()
    seen.clear()
    assert run(tiny_args(tiny_model_dir, tmp_path / "forced", "--rollout_dtype", "bfloat16")) == 0
    assert seen["dtypes"] == [torch.bfloat16, torch.bfloat16]


def test_k_rollouts_per_prompt(tiny_model_dir, tmp_path):
    out = tmp_path / "k4"
    assert run(tiny_args(tiny_model_dir, out, "--num_rollouts", 4, "--max_steps", 1)) == 0
    ids = [s["id"] for s in read_jsonl(out / "samples.jsonl")]
    assert len(ids) == 8 and len(set(ids)) == 2 and all(ids.count(i) == 4 for i in set(ids))


def test_method_switch_and_identical_first_update_at_identity(tiny_model_dir, tmp_path):
    """tent has no predictor; zerosiam with a fresh P = I makes the same first LoRA update (alpha 0 and 1)."""
    runs = {}
    for name, extra in {"tent": ["--method", "tent"], "zs0": ["--alpha", 0], "zs1": ["--alpha", 1]}.items():
        out = tmp_path / name
        assert run(tiny_args(tiny_model_dir, out, "--max_steps", 1, *extra)) == 0
        runs[name] = adapter_state(out)
    assert not (tmp_path / "tent" / "zerosiam_predictor.safetensors").exists()
    assert (tmp_path / "zs0" / "zerosiam_predictor.safetensors").exists()
    # equal gradients up to fp32 round-off (the Tent and ZeroSiam kernels sum in different orders); Adam's first
    # step is ~lr * sign(g), so entries with |g| near eps may differ by a small fraction of lr (3e-4)
    for other in ("zs0", "zs1"):
        assert runs["tent"].keys() == runs[other].keys()
        for key in runs["tent"]:
            torch.testing.assert_close(runs["tent"][key], runs[other][key], rtol=1e-4, atol=3e-6)
    # and the update is real: LoRA B moved off zero
    assert any(v.abs().sum() > 0 for k, v in runs["tent"].items() if "lora_B" in k)


@pytest.mark.parametrize("method", ["zerosiam", "come"])
def test_labels_never_change_a_gradient(method, tiny_model_dir, tmp_path):
    """The same run with and without the gold-answer column ends in bit-identical adapter (and predictor)."""
    with_gold, without_gold = tmp_path / "gold", tmp_path / "nogold"
    assert run(tiny_args(tiny_model_dir, with_gold, "--answer_field", "answer", "--method", method)) == 0
    assert run(tiny_args(tiny_model_dir, without_gold, "--method", method)) == 0
    a, b = adapter_state(with_gold), adapter_state(without_gold)
    assert all(torch.equal(a[k], b[k]) for k in a)
    lora_b = next(v for k, v in a.items() if "lora_B" in k)
    assert lora_b.abs().sum() > 0  # the runs did train
    if method == "zerosiam":
        pa = load_file(str(with_gold / "zerosiam_predictor.safetensors"))
        pb = load_file(str(without_gold / "zerosiam_predictor.safetensors"))
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    else:
        assert not (with_gold / "zerosiam_predictor.safetensors").exists()
    gold_metrics = [m for m in read_jsonl(with_gold / "metrics.jsonl") if "loss" in m]
    assert "monitor/accuracy" in gold_metrics[0]
    assert not any("monitor/accuracy" in m for m in read_jsonl(without_gold / "metrics.jsonl"))
    assert [m["loss"] for m in gold_metrics] == [
        m["loss"] for m in read_jsonl(without_gold / "metrics.jsonl") if "loss" in m
    ]


def _train_cmd(model_dir, out, max_steps):
    return [sys.executable, str(REPO / "train.py"), *tiny_args(model_dir, out, "--max_steps", max_steps,
            "--max_completion_length", 48, "--answer_field", "answer", "--monitor_every", 1000)]  # fmt: skip


def test_exact_resume_after_sigkill(tiny_model_dir, tmp_path):
    """4 steps straight == 2 steps, SIGKILL, resume: same losses, same predictor, no prompt repeated or skipped."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(_train_cmd(tiny_model_dir, straight, 4), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(_train_cmd(tiny_model_dir, resumed, 4), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while not (resumed / "checkpoint-2" / "trainer_state.json").is_file():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (resumed / "summary.json").exists()  # killed mid-run
    subprocess.run(_train_cmd(tiny_model_dir, resumed, 4), check=True, env=env, capture_output=True)

    def losses(out):
        return [(m["step"], m["loss"]) for m in read_jsonl(out / "metrics.jsonl") if "loss" in m]

    assert [s for s, _ in losses(resumed)] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(losses(straight), losses(resumed), strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    pa = load_file(str(straight / "zerosiam_predictor.safetensors"))
    pb = load_file(str(resumed / "zerosiam_predictor.safetensors"))
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-5, atol=1e-7)

    def prompts(out):
        return [(s["step"], s["id"], s["completion"]) for s in read_jsonl(out / "samples.jsonl")]

    assert prompts(straight) == prompts(resumed)


def test_push_to_hub_uploads_adapter_predictor_and_card(tiny_model_dir, tmp_path, monkeypatch):
    import transformers.trainer

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("Url", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, ignore_patterns=None, **kwargs):
            files = sorted(
                str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*")
                if p.is_file() and not any(Path(str(p.relative_to(folder_path))).match(pat) or
                                           str(p.relative_to(folder_path)).split("/")[0].startswith(pat.rstrip("*"))
                                           for pat in ignore_patterns or [])
            )  # fmt: skip
            calls.append({"repo_id": repo_id, "files": files, "folder": folder_path})

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: FakeApi())
    out = tmp_path / "push"
    secret = "hf_NotARealTokenButSecret123"
    argv = tiny_args(tiny_model_dir, out, "--push_to_hub", "true", "--hub_model_id", "someone/zs-tiny",
                     "--hub_strategy", "end", "--hub_token", secret)  # fmt: skip
    assert run(argv) == 0
    final = calls[-1]
    assert final["repo_id"] == "someone/zs-tiny"
    for name in ("adapter_model.safetensors", "adapter_config.json", "zerosiam_predictor.safetensors", "README.md"):
        assert name in final["files"]
    assert not any(f.startswith("checkpoint-") for f in final["files"])
    card = (out / "README.md").read_text()
    assert "**Trained without labels**" in card
    assert "ZeroSiam" in card and "library_name: peft" in card and "| steps | 2 |" in card
    assert "mean token entropy" in card
    # TRL's card, completed: the paper cited and linked, the adapter's loading code, no template leftovers
    assert "https://huggingface.co/papers/2509.23183" in card and "@inproceedings{chen2026zerosiam" in card
    assert "PeftModel.from_pretrained" in card and "None" not in card and "Cite TRL as" in card
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"token leaked into {path}"


def test_use_vllm_without_vllm_names_the_extra(capsys, tmp_path):
    code = run(["--use_vllm", "true", "--output_dir", str(tmp_path / "v")])
    err = capsys.readouterr().err
    assert code == 2 and "zerosiam-llm[vllm]" in err and err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["python", "accelerate"])
def test_embedded_recipe_two_steps_offline(tmp_path, launcher):
    """The README's main job, shortened: no GPU, no network; adapter loads with plain peft."""
    out = tmp_path / f"embedded-{launcher}"
    prefix = [sys.executable] if launcher == "python" else [sys.executable, "-m", "accelerate.commands.launch",
                                                             "--num_processes", "1", "--cpu"]  # fmt: skip
    cmd = [*prefix, str(REPO / "train.py"), "--recipe", "smollm2-135m-cpu.yaml", "--max_steps", "2",
           "--output_dir", str(out), "--max_completion_length", "32"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "entropy H(p_r)" in proc.stdout
    assert (out / "zerosiam_predictor.safetensors").is_file()
    assert len([m for m in read_jsonl(out / "metrics.jsonl") if "loss" in m]) == 2
    keys = load_file(str(out / "adapter_model.safetensors")).keys()
    assert keys and not any("predictor" in k for k in keys)
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(str(out)).r == 16


def _logged(out):
    return [m for m in read_jsonl(Path(out) / "metrics.jsonl") if "loss" in m]


def test_monitors_are_logged(tiny_model_dir, tmp_path):
    out = tmp_path / "mon"
    assert run(tiny_args(tiny_model_dir, out, "--max_steps", 1)) == 0
    m = _logged(out)[0]
    for key in ("monitor/repetition", "monitor/longest_repeated_span", "monitor/dominance", "coherence/base_nll",
                "completions/answer_rate", "train/nonfinite_skipped"):  # fmt: skip
        assert key in m, key
    assert m["coherence/base_nll"] > 0


PLANTED = '[{"metric": "zerosiam/predictor_deviation", "above": 0.3, "action": "%s"%s}]'
PLANTED_RATIO = ("--predictor_lr_ratio", 10)  # the predictor passes 0.3 after 2 updates (not 1): a healthy one first


def test_guard_stop_keeps_the_last_healthy_adapter(tiny_model_dir, tmp_path):
    """A planted condition (the predictor drifting past 0.3) stops the run; the result is the last healthy adapter."""
    out = tmp_path / "stop"
    rules = PLANTED % ("stop", "")
    argv = tiny_args(tiny_model_dir, out, "--max_steps", 6, "--save_steps", 1, "--guard_rules", rules, *PLANTED_RATIO)
    assert run(argv) == 0
    logged = _logged(out)
    fired = json.loads((out / "guard_events.jsonl").read_text().splitlines()[0])
    assert fired["action"] == "stop" and logged[-1]["step"] == fired["step"] < 6
    summary = json.loads((out / "summary.json").read_text())
    healthy = Path(summary["stopped_by_guard"]["adapter_from"])
    assert healthy.parent.name == "healthy" and int(healthy.name.split("-")[1]) < fired["step"]
    final, kept = adapter_state(out), adapter_state(healthy)
    assert final.keys() == kept.keys() and all(torch.equal(final[k], kept[k]) for k in final)
    pf = load_file(str(out / "zerosiam_predictor.safetensors"))
    ph = load_file(str(healthy / "zerosiam_predictor.safetensors"))
    assert all(torch.equal(pf[k], ph[k]) for k in pf)


def test_guard_rollback_restores_the_checkpoint_and_lowers_the_lr(tiny_model_dir, tmp_path):
    out = tmp_path / "rollback"
    rules = PLANTED % ("rollback", ', "lr_factor": 0.5')
    assert run(tiny_args(tiny_model_dir, out, "--max_steps", 5, "--save_steps", 1, "--guard_rules", rules,
                         *PLANTED_RATIO)) == 0  # fmt: skip
    logged = {m["step"]: m for m in _logged(out)}
    fired = json.loads((out / "guard_events.jsonl").read_text().splitlines()[0])["step"]
    summary = json.loads((out / "summary.json").read_text())
    restored = Path(summary["rollbacks"][0]["restored"])
    restored_step = int(restored.name.split("-")[1])
    # the step after the rollback trains from the checkpoint's weights: its logged predictor deviation is exactly
    # the one logged right after that checkpoint was saved (computed from the same weights)
    deviation = logged[fired + 1]["zerosiam/predictor_deviation"]
    assert deviation == logged[restored_step + 1]["zerosiam/predictor_deviation"]
    # HF logs the lr the scheduler held when the step began: the halved lr shows from the second step after
    assert logged[fired + 2]["learning_rate"] == pytest.approx(logged[fired]["learning_rate"] * 0.5)
    assert 5 in logged  # and the run continued


def test_non_finite_steps_are_skipped_then_stop(tiny_model_dir, tmp_path, monkeypatch):
    import zerosiam_llm.zerosiam_trainer as trainer_module

    real = trainer_module.zerosiam_loss

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer_module, "zerosiam_loss", poisoned)
    out = tmp_path / "nan"
    assert run(tiny_args(tiny_model_dir, out, "--max_steps", 6, "--save_steps", 1)) == 0
    logged = _logged(out)
    assert [m["train/nonfinite_skipped"] for m in logged] == [1.0, 1.0, 1.0]  # stopped after 3 in a row
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nonfinite_skipped_steps"] == 3 and "non-finite" in summary["stopped_by_guard"]["message"]
    state = adapter_state(out)  # every update was skipped: the adapter is the fresh one (B = 0), all finite
    assert all(torch.isfinite(v).all() for v in state.values())
    assert all(v.abs().sum() == 0 for k, v in state.items() if "lora_B" in k)


@pytest.mark.parametrize("predictor_optimizer", ["sgd", "adamw"])
def test_predictor_optimizer(tiny_model_dir, tmp_path, predictor_optimizer):
    """SGD moves the predictor by at most lr x the clipped gradient norm (1.0) on its first step; AdamW by about
    lr x sqrt(d^2) = lr x d (every entry by ~lr). The LoRA group stays AdamW either way."""
    out = tmp_path / predictor_optimizer
    lr = 1e-3  # predictor lr: 10 x 1e-4
    assert run(tiny_args(tiny_model_dir, out, "--predictor_optimizer", predictor_optimizer,
                         "--learning_rate", 1e-4, "--predictor_lr_ratio", 10)) == 0  # fmt: skip
    metrics = [m for m in read_jsonl(out / "metrics.jsonl") if "loss" in m]
    moved = metrics[1]["zerosiam/predictor_deviation"]  # logged at step 2: after one update
    if predictor_optimizer == "sgd":
        assert 0 < moved <= lr * 1.0 + 1e-7
    else:
        assert moved > 10 * lr  # d = 64: about 64 x lr
    with open(out / "resolved_config.yaml") as f:
        assert f"predictor_optimizer: {predictor_optimizer}" in f.read()


def test_predictor_clip_holds_when_max_grad_norm_is_0(tiny_model_dir, tmp_path):
    """transformers calls _clip_grad_norm only when max_grad_norm > 0; the predictor's clip must hold anyway."""
    out = tmp_path / "no-global-clip"
    lr, clip = 1e-3, 1e-4
    assert run(tiny_args(tiny_model_dir, out, "--predictor_optimizer", "sgd", "--learning_rate", 1e-4,
                         "--predictor_lr_ratio", 10, "--max_grad_norm", 0, "--predictor_max_grad_norm", clip)) == 0
    metrics = [m for m in read_jsonl(out / "metrics.jsonl") if "loss" in m]
    assert metrics[0]["grad_norm/predictor"] > 100 * clip  # the raw norm is logged; the step uses the clipped one
    assert 0 < metrics[1]["zerosiam/predictor_deviation"] <= lr * clip + 1e-9


def test_group_clipping_under_deepspeed_or_fsdp_is_refused(tmp_path):
    from zerosiam_llm.errors import UserInputError
    from zerosiam_llm.zerosiam_config import ZeroSiamConfig
    from zerosiam_llm.zerosiam_trainer import check_group_clipping

    args = ZeroSiamConfig(output_dir=str(tmp_path))
    with pytest.raises(UserInputError, match="DeepSpeed and FSDP cannot do .* set predictor_max_grad_norm: 0"):
        check_group_clipping(args, sharded=True)
    check_group_clipping(args, sharded=False)
    check_group_clipping(ZeroSiamConfig(output_dir=str(tmp_path), predictor_max_grad_norm=0.0), sharded=True)
    check_group_clipping(ZeroSiamConfig(output_dir=str(tmp_path), method="tent"), sharded=True)


# the hooks of TRL / transformers this project overrides or calls (private ones can change in any release): a TRL
# upgrade that renames or reshapes one fails here, loudly, instead of being silently bypassed
OVERRIDDEN = ("get_train_dataloader", "_get_train_sampler", "_generate_single_turn", "_prepare_inputs",
              "training_step", "_generate_and_score_completions", "_compute_loss", "create_optimizer",
              "_clip_grad_norm", "_get_grad_norm", "_save", "_load_from_checkpoint", "create_model_card")  # fmt: skip
CALLED = {
    "_get_last_hidden_state": ("unwrapped_model", "input_ids", "attention_mask", "logits_to_keep"),
    "set_initial_training_values": ("args", "dataloader"),
    "_has_mixed_mesh_grads": ("model",),
    "get_train_dataloader": (),
    "train": ("resume_from_checkpoint",),
}


def _parameters(fn) -> list[tuple[str, object]]:
    return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("name", OVERRIDDEN)
def test_overridden_hooks_keep_their_signatures(name):
    parent = getattr(DistillationTrainer, name, None)
    assert parent is not None, f"DistillationTrainer.{name} is gone: ZeroSiamTrainer.{name} would never be called"
    assert _parameters(getattr(ZeroSiamTrainer, name)) == _parameters(parent), f"{name} changed its signature"


def test_called_hooks_and_helpers_exist():
    from trl.generation.vllm_generation import VLLMGeneration
    from trl.trainer.utils import RepeatSampler

    for name, leading in CALLED.items():
        fn = getattr(DistillationTrainer, name, None)
        assert fn is not None, f"DistillationTrainer.{name} is gone"
        names = [p for p, _ in _parameters(fn)][1 : 1 + len(leading)]
        assert tuple(names) == leading, f"{name}{inspect.signature(fn)}"
    assert [p for p, _ in _parameters(VLLMGeneration._iter_named_params)] == ["self"]
    assert [p for p, _ in _parameters(RepeatSampler.__init__)][1:7] == [
        "data_source", "mini_repeat_count", "batch_size", "repeat_count", "shuffle", "seed"]  # fmt: skip

"""ZeroSiamTrainer on a tiny random model (fast) and the real embedded SmolLM2 through train.py (slow)."""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from trl import DistillationTrainer

from zerosiam_llm.cli import train_main
from zerosiam_llm.files import read_jsonl
from zerosiam_llm.testing import direct_trainer, run_killed_after_checkpoint
from zerosiam_llm.trainers.entropy import ZeroSiamTrainer

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
    from zerosiam_llm.trainers import entropy as trainer_module

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


@pytest.mark.parametrize("method", ["zerosiam", "come", "sar"])
def test_labels_never_change_a_gradient(method, tiny_model_dir, tmp_path):
    """The same run with and without the gold-answer column ends in bit-identical adapter (and predictor)."""
    with_gold, without_gold = tmp_path / "gold", tmp_path / "nogold"
    # the random model's entropies sit near ln V: SAR's filter must keep some tokens for the run to train
    sar = ["--sar_margin", SAR_MARGIN, "--sar_margin_unit", "ln_v"]
    extra = ["--method", method] + (sar if method == "sar" else [])
    assert run(tiny_args(tiny_model_dir, with_gold, "--answer_field", "answer", *extra)) == 0
    assert run(tiny_args(tiny_model_dir, without_gold, *extra)) == 0
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


SAR_MARGIN = 0.985  # the tiny random model's token entropies sit near 0.985 ln V: the filter keeps part of them


def test_sar_step_keeps_the_gradient_at_the_perturbed_weights(tiny_model_dir, tmp_path):
    """SAR's training_step: pass 1 at w on the rollouts, w + rho g1/||g1||, pass 2 on the same rollouts over the
    tokens reliable in both passes; the gradient left for the optimizer is pass 2's, the weights are back at w."""
    trainer = direct_trainer(tiny_model_dir, tmp_path, method="sar", sar_rho=0.5, sar_margin=SAR_MARGIN,
                              sar_margin_unit="ln_v")  # fmt: skip
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by train(), which this test does not call
    prepared = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer._prepare_rollouts = lambda batch: prepared  # the same rollouts for the step and the check
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    trainer.training_step(model, prepared, None)
    step_grads = [p.grad.clone() for p in params]
    for p, s in zip(params, start, strict=True):  # back at exactly w (the saved weights are restored)
        assert torch.equal(p.detach(), s)

    # by hand, through the same loss
    model.zero_grad(set_to_none=True)
    trainer._sam_pass = 1
    trainer.compute_loss(model, prepared).backward()
    kept = trainer._sam_kept
    assert 0 < kept.float().mean() < 1  # the filter is active in this check
    g1 = [p.grad.clone() for p in params]
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in g1]))
    with torch.no_grad():
        for p, g in zip(params, g1, strict=True):
            p.add_(0.5 * g / norm)
    model.zero_grad(set_to_none=True)
    trainer._sam_pass = 2
    trainer.compute_loss(model, prepared).backward()
    trainer._sam_pass = 0
    second = [p.grad for p in params]
    for got, want in zip(step_grads, second, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(w, f) for w, f in zip(second, g1, strict=True))  # rho moved the gradient


def test_sar_model_recovery_resets_the_adapter_and_logs_it(tiny_model_dir, tmp_path):
    """A threshold above any loss fires at every step: the adapter is back at its start (LoRA B = 0), each reset is a
    guard event, and the average's state is saved with the checkpoint."""
    out = tmp_path / "sar"
    sar = ["--method", "sar", "--sar_margin", SAR_MARGIN, "--sar_margin_unit", "ln_v"]
    assert run(tiny_args(tiny_model_dir, out, *sar, "--sar_reset_below", 100)) == 0
    events = read_jsonl(out / "guard_events.jsonl")
    assert [(e["step"], e["action"], e["metric"]) for e in events] == [(1, "reset", "sar/loss_ema"),
                                                                       (2, "reset", "sar/loss_ema")]  # fmt: skip
    assert all(v.abs().sum() == 0 for k, v in adapter_state(out).items() if "lora_B" in k)
    metrics = [m for m in read_jsonl(out / "metrics.jsonl") if "loss" in m]
    assert [m["sar/resets"] for m in metrics] == [1.0, 2.0] and 0 < metrics[0]["sar/reliable_share"] <= 1
    state = json.loads((out / "checkpoint-2" / "sar_recovery.json").read_text())
    assert state["resets"] == 2 and state["ema"] > 0 and state["initial"] == pytest.approx(metrics[0]["sar/loss_ema"])
    # a longer run resumes the checkpoint and its recovery state: the count goes on from 2
    longer = ["--sar_reset_below", 100, "--max_steps", 3, "--save_steps", 1]
    assert run(tiny_args(tiny_model_dir, out, *sar, *longer)) == 0
    assert [m["sar/resets"] for m in read_jsonl(out / "metrics.jsonl") if "loss" in m] == [1.0, 2.0, 3.0]
    normal = tmp_path / "normal"  # the default threshold (0.2) does not fire on this model's entropies
    assert run(tiny_args(tiny_model_dir, normal, *sar)) == 0
    assert not (normal / "guard_events.jsonl").exists()
    assert any(v.abs().sum() > 0 for k, v in adapter_state(normal).items() if "lora_B" in k)


def _train_cmd(model_dir, out, max_steps):
    return [sys.executable, str(REPO / "train.py"), *tiny_args(model_dir, out, "--max_steps", max_steps,
            "--max_completion_length", 48, "--answer_field", "answer", "--monitor_every", 1000)]  # fmt: skip


def test_exact_resume_after_sigkill(tiny_model_dir, tmp_path):
    """4 steps straight == 2 steps, SIGKILL, resume: same losses, same predictor, no prompt repeated or skipped."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(_train_cmd(tiny_model_dir, straight, 4), check=True, env=env, capture_output=True)
    run_killed_after_checkpoint(_train_cmd(tiny_model_dir, resumed, 4)[2:], env, step=2)  # right after checkpoint-2
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
    import zerosiam_llm.trainers.entropy as trainer_module

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
    from zerosiam_llm.configs import ZeroSiamConfig
    from zerosiam_llm.errors import UserInputError
    from zerosiam_llm.trainers.entropy import check_group_clipping

    args = ZeroSiamConfig(output_dir=str(tmp_path))
    with pytest.raises(UserInputError, match="DeepSpeed and FSDP cannot do .* set predictor_max_grad_norm: 0"):
        check_group_clipping(args, sharded=True)
    check_group_clipping(args, sharded=False)
    check_group_clipping(ZeroSiamConfig(output_dir=str(tmp_path), predictor_max_grad_norm=0.0), sharded=True)
    check_group_clipping(ZeroSiamConfig(output_dir=str(tmp_path), method="tent"), sharded=True)


def test_sar_sharpness_aware_pass_needs_unsharded_gradients(tmp_path):
    from zerosiam_llm.configs import ZeroSiamConfig
    from zerosiam_llm.errors import UserInputError
    from zerosiam_llm.trainers.entropy import _check_sam_supported

    sar = ZeroSiamConfig(output_dir=str(tmp_path), method="sar")
    with pytest.raises(UserInputError, match="needs unsharded parameters and gradients .* or sar_rho: 0"):
        _check_sam_supported(sar, sharded=True, num_processes=2)
    accumulating = ZeroSiamConfig(output_dir=str(tmp_path), method="sar", gradient_accumulation_steps=2)
    with pytest.raises(UserInputError, match="needs gradient_accumulation_steps: 1"):
        _check_sam_supported(accumulating, sharded=False, num_processes=2)
    _check_sam_supported(accumulating, sharded=False, num_processes=1)  # one process: the held gradients are local
    _check_sam_supported(sar, sharded=False, num_processes=2)  # DDP
    _check_sam_supported(ZeroSiamConfig(output_dir=str(tmp_path), method="sar", sar_rho=0.0), True, 2)  # one pass
    with pytest.raises(UserInputError, match=r"sar_ema_decay must be in \[0, 1\), got 1.0"):
        ZeroSiamConfig(output_dir=str(tmp_path), method="sar", sar_ema_decay=1.0)
    with pytest.raises(UserInputError, match="sar_margin must be > 0"):
        ZeroSiamConfig(output_dir=str(tmp_path), method="sar", sar_margin=0.0)


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
    from transformers import Trainer  # SAR's second pass calls it directly (no rollouts, no step count)

    assert [p for p, _ in _parameters(Trainer.training_step)][1:4] == ["model", "inputs", "num_items_in_batch"]
    assert [p for p, _ in _parameters(RepeatSampler.__init__)][1:7] == [
        "data_source", "mini_repeat_count", "batch_size", "repeat_count", "shuffle", "seed"]  # fmt: skip

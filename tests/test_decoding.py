"""EM-INF (``decoding.py``) against the reference's autograd Adam, and ``--decoding em-inf`` end to end."""

import json

import pytest
import torch
import torch.nn.functional as F

from zerosiam_llm.decoding import EMInfLogitsProcessor


def _reference_em_inf(logits, lr=0.1, steps=5, kl_weight=1e-3, threshold=0.3):
    """The reference code's loop for one row: shivamag125/EM_PT @ 91cda30b4991c03be54fd2bfb017b37cb5982bb8,
    ``eval/utils/em_inf_utils.py`` L285-318 (``ent_sample``): Adam on the fp32 logits, ``entropy + kl_weight *
    kl_div(log q, p0, batchmean)``, the threshold checked before each step; its 1e-12 inside the log is left out."""
    rows = []
    for row in logits:
        original = F.softmax(row[None], -1)
        param = torch.nn.Parameter(row[None].clone())
        optimizer = torch.optim.Adam([param], lr=lr)
        for _ in range(steps):
            optimizer.zero_grad()
            probs = F.softmax(param, -1)
            entropy = -torch.sum(probs * torch.log(probs))
            if entropy < threshold:
                break
            (kl_weight * F.kl_div(probs.log(), original, reduction="batchmean") + entropy).backward()
            optimizer.step()
        rows.append(param.detach()[0])
    return torch.stack(rows)


def test_em_inf_matches_the_reference_adam_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 64, generator=g, dtype=torch.float64) * torch.tensor([0.3, 1, 3, 10, 30])[:, None]
    got = EMInfLogitsProcessor()(None, logits.clone())
    torch.testing.assert_close(got, _reference_em_inf(logits), rtol=0, atol=1e-9)
    entropy = lambda z: -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)  # noqa: E731
    before, after = entropy(logits), entropy(got)
    assert (after[before >= 0.3] < before[before >= 0.3]).all()  # lower entropy where it was above the threshold
    assert torch.equal(got[before < 0.3], logits[before < 0.3])  # confident rows are left as they are


@pytest.mark.parametrize("settings", [(0.1, 3, 0.05, 0.3), (0.05, 5, 0.01, 0.1)])
def test_em_inf_hyper_parameters_match_the_reference(settings):
    """The authors' evaluation setting (KL 0.05, 3 steps; ``evaluation_scripts/em_inf_eval.sh`` L18-21) and another."""
    from zerosiam_llm.decoding import EMInfSettings

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 48, generator=g, dtype=torch.float64) * torch.tensor([0.5, 2, 6, 20])[:, None]
    got = EMInfSettings(*settings).processor()(None, logits.clone())
    torch.testing.assert_close(got, _reference_em_inf(logits, *settings), rtol=0, atol=1e-9)
    assert not torch.allclose(got, _reference_em_inf(logits), atol=1e-6)  # the fixed defaults differ


def test_em_inf_runs_on_the_raw_logits_before_hf_processors(tiny_model_dir):
    """As the reference (optimise ``outputs.logits[:, -1]``, then ``logits_processor``): what EM-INF sees at the
    first step is the model's raw logits, not the repetition-penalised ones a LogitsProcessor would get."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

    from zerosiam_llm.decoding import em_inf_before_processors

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok(["1 + 1 = 2, 2 + 2 ="], return_tensors="pt")
    seen = []

    class Recording(EMInfLogitsProcessor):
        def __call__(self, input_ids, scores):
            seen.append(scores.clone())
            return super().__call__(input_ids, scores)

    kwargs = {"max_new_tokens": 3, "do_sample": False, "repetition_penalty": 1.5, "pad_token_id": tok.pad_token_id}
    with torch.inference_mode():
        raw = model(**ids).logits[:, -1].float()
        with em_inf_before_processors(model, Recording()):
            model.generate(**ids, **kwargs)
        before = seen[0]
        seen.clear()
        model.generate(**ids, logits_processor=LogitsProcessorList([Recording()]), **kwargs)  # the wrong variant
    torch.testing.assert_close(before, raw, rtol=0, atol=1e-6)
    assert not torch.allclose(seen[0], raw, atol=1e-3)  # after the repetition penalty
    assert model.get_output_embeddings()._forward_hooks == {}  # the hook is gone after the call


def test_em_inf_keeps_masked_tokens_masked():
    logits = torch.tensor([[1.0, 0.5, float("-inf"), 0.2]])
    out = EMInfLogitsProcessor()(None, logits)
    assert out[0, 2] == float("-inf") and torch.isfinite(out[0, [0, 1, 3]]).all()


def test_evaluation_with_em_inf_decoding(tmp_path, tiny_model_dir, capsys):
    from zerosiam_llm.evaluation import main

    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}) + "\n"
                            for i in range(3)))  # fmt: skip
    base = ["--model", str(tiny_model_dir), "--benchmarks", "gsm8k", "--data_file", f"gsm8k={data}",
            "--max_new_tokens", "6", "--dtype", "float32", "--no_progress", "--grader_workers", "1"]  # fmt: skip
    assert main([*base, "--output_dir", str(tmp_path / "em"), "--decoding", "em-inf"]) == 0
    config = json.loads((tmp_path / "em" / "run_config.json").read_text())
    assert config["decoding"] == "em-inf" and config["generation"]["decoding"] == "em-inf"
    assert config["em_inf"] == {"learning_rate": 0.1, "steps": 5, "kl_weight": 0.001, "threshold": 0.3}
    authors = ["--em_inf_kl_weight", "0.05", "--em_inf_steps", "3"]  # the authors' evaluation setting: another run
    assert main([*base, "--output_dir", str(tmp_path / "em"), "--decoding", "em-inf", *authors]) == 2
    assert "differs in em_inf" in capsys.readouterr().err
    assert main([*base, "--output_dir", str(tmp_path / "em2"), "--decoding", "em-inf", *authors]) == 0
    assert json.loads((tmp_path / "em2" / "run_config.json").read_text())["em_inf"]["steps"] == 3
    assert main([*base, "--output_dir", str(tmp_path / "bad"), "--decoding", "em-inf", "--em_inf_steps", "0"]) == 2
    assert "em_inf_steps must be an integer >= 1" in capsys.readouterr().err
    assert main([*base, "--output_dir", str(tmp_path / "em"), "--decoding", "standard"]) == 2  # another run
    assert "differs in decoding" in capsys.readouterr().err
    assert main([*base, "--output_dir", str(tmp_path / "v"), "--decoding", "em-inf", "--backend", "vllm"]) == 2
    assert "decoding em-inf needs --backend hf" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["tent", "majority-vote"])
def test_online_predictions_with_em_inf(method, tiny_model_dir, tmp_path, monkeypatch):
    """The online stream's rollouts (the predictions) go through EM-INF in both trainers."""
    from zerosiam_llm import decoding
    from zerosiam_llm.cli import train_main

    calls = []
    original = decoding.EMInfLogitsProcessor.__call__
    def counted(self, ids, scores):
        calls.append(scores.shape)
        assert self.steps == 2
        return original(self, ids, scores)

    monkeypatch.setattr(decoding.EMInfLogitsProcessor, "__call__", counted)
    extra = ["--num_rollouts", "2", "--temperature", "1.0"] if method == "majority-vote" else []
    argv = ["--recipe", "smollm2-135m-online-cpu", "--model", str(tiny_model_dir), "--output_dir", str(tmp_path / "o"),
            "--method", method, "--max_completion_length", "6", "--num_problems", "4", "--stream_batch_size", "4",
            "--decoding", "em-inf", "--em_inf_steps", "2", "--disable_tqdm", "true", *extra]  # fmt: skip
    assert train_main(argv) == 0
    assert len(calls) >= 1 and calls[0][0] == 4 * (2 if extra else 1)  # every rollout row of the batch
    import yaml

    resolved = yaml.safe_load((tmp_path / "o" / "resolved_config.yaml").read_text())
    assert resolved["em_inf_steps"] == 2 and resolved["em_inf_kl_weight"] == 0.001
    from zerosiam_llm.errors import UserInputError
    from zerosiam_llm.parser import build_config

    with pytest.raises(UserInputError, match="decoding em-inf needs HF generate"):
        build_config("smollm2-135m-cpu", {"decoding": "em-inf", "use_vllm": "true"})

"""EM-INF (``decoding.py``) against the reference's autograd Adam, and ``--decoding em-inf`` end to end."""

import json

import pytest
import torch
import torch.nn.functional as F

from zerosiam_llm.decoding import EMInfLogitsProcessor


def _reference_em_inf(logits, lr=0.1, steps=5, kl_weight=1e-3, threshold=0.3):
    """The reference code's loop (``ent_sample``) for one row: Adam on the logits, entropy + KL to the original."""
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
        return original(self, ids, scores)

    monkeypatch.setattr(decoding.EMInfLogitsProcessor, "__call__", counted)
    extra = ["--num_rollouts", "2", "--temperature", "1.0"] if method == "majority-vote" else []
    argv = ["--recipe", "smollm2-135m-online-cpu", "--model", str(tiny_model_dir), "--output_dir", str(tmp_path / "o"),
            "--method", method, "--max_completion_length", "6", "--num_problems", "4", "--stream_batch_size", "4",
            "--decoding", "em-inf", "--disable_tqdm", "true", *extra]  # fmt: skip
    assert train_main(argv) == 0
    assert len(calls) >= 1 and calls[0][0] == 4 * (2 if extra else 1)  # every rollout row of the batch
    from zerosiam_llm.errors import UserInputError
    from zerosiam_llm.parser import build_config

    with pytest.raises(UserInputError, match="decoding em-inf needs HF generate"):
        build_config("smollm2-135m-cpu", {"decoding": "em-inf", "use_vllm": "true"})

#!/usr/bin/env bash
# GPU-side checks, run when a GPU machine is lent (it has no network: everything is built locally).
#   bash scripts/gpu_check.sh [OUT]     (~5-8 minutes on one H100; needs torch with CUDA and the repo installed)
# 1. loss step ZeroSiam / Tent on a Qwen2.5-1.5B-shaped head in bf16 (d = 1536, V = 151936)
# 2. loss memory (peak extra, CUDA allocator) at N = 1k, 4k, 16k tokens, fused vs naive full logits
# 3. a short qwen-0.5b-shaped training run (random Qwen2 model saved locally, bf16, LoRA) with HF generate,
#    and with vLLM colocate when vllm is importable (TRL's LoRA-merged weight sync + our predictor filter)
set -euo pipefail
OUT=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pip install -q -e . --no-deps 2>/dev/null || true
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/device.txt"

echo "== 1. loss step, 1.5B-shaped head, bf16" | tee -a "$OUT/report.md"
python - <<'PY' | tee -a "$OUT/report.md"
import statistics, time, torch
from zerosiam_llm.objectives import tent_loss, zerosiam_loss, reference_terms
from zerosiam_llm.predictor import Predictor
torch.manual_seed(0)
D, V, N = 1536, 151936, 8 * 1024
w = torch.randn(V, D, device="cuda", dtype=torch.bfloat16).mul_(0.02)
h = torch.randn(1, N, D, device="cuda", dtype=torch.bfloat16)
mask = torch.ones(1, N, dtype=torch.bool, device="cuda")
P = Predictor(D, "full").cuda()
def run(kind):
    x = h.clone().requires_grad_(True)
    torch.cuda.synchronize(); t = time.perf_counter()
    if kind == "tent":
        loss = tent_loss(x, mask, w).loss
    elif kind == "zerosiam":
        loss = zerosiam_loss(x, mask, w, P).loss
    else:
        r = x[mask]; a, b, c, _ = reference_terms(P(r), r.float(), w.float()); loss = (a + b + c).mean()
    loss.backward(); torch.cuda.synchronize(); return time.perf_counter() - t
res = {}
for kind in ("tent", "zerosiam", "naive"):
    run(kind)
for _ in range(5):
    for kind in ("tent", "zerosiam", "naive"):
        res.setdefault(kind, []).append(run(kind))
med = {k: statistics.median(v) for k, v in res.items()}
print(f"N={N} tokens: tent {med['tent']*1e3:.1f} ms, zerosiam {med['zerosiam']*1e3:.1f} ms, naive {med['naive']*1e3:.1f} ms; "
      f"zerosiam/tent {med['zerosiam']/med['tent']:.3f}, zerosiam/naive {med['zerosiam']/med['naive']:.3f}")
PY

echo "== 2. loss memory, 0.5B-shaped head (d=896), bf16 inputs" | tee -a "$OUT/report.md"
python benchmarks/speed/bench_loss_memory.py --device cuda --dtype bfloat16 --naive_max 16384 \
    2>/dev/null | tee -a "$OUT/report.md"

echo "== 3. qwen-0.5b-shaped training run (random weights, saved locally)" | tee -a "$OUT/report.md"
python - <<PY
from zerosiam_llm.testing import build_tiny_causal_lm
build_tiny_causal_lm("$OUT/qwen-shaped", hidden_size=896, num_layers=4, num_heads=14, num_kv_heads=2,
                     intermediate_size=4864, architecture="qwen2")
PY
COMMON="--recipe qwen-0.5b --model $OUT/qwen-shaped --dataset generated:arithmetic --answer_field answer
        --answer_style plain --num_problems 64 --max_steps 3 --save_steps 3 --max_completion_length 64
        --per_device_train_batch_size 8 --gradient_accumulation_steps 1 --num_rollouts 2 --report_to none"
( time python train.py $COMMON --use_vllm false --output_dir "$OUT/run-hf" ) 2>&1 | tail -8 | tee -a "$OUT/report.md"
if python -c "import vllm" 2>/dev/null; then
  ( time python train.py $COMMON --use_vllm true --vllm_mode colocate --vllm_gpu_memory_utilization 0.3 \
      --output_dir "$OUT/run-vllm" ) 2>&1 | tail -8 | tee -a "$OUT/report.md"
else
  echo "vllm not installed on this machine: vLLM colocate not checked" | tee -a "$OUT/report.md"
fi
echo "report: $OUT/report.md"

#!/usr/bin/env bash
# What only a CUDA machine can check, in one go (about 5-8 minutes on one GPU with the embedded SmolLM2-135M):
#   1. packed logits == unpacked (each sample alone) on CUDA: float32 sdpa exactly, bfloat16 sdpa and
#      flash-attention-2 (if installed) up to bf16 rounding, through medgpt's own collator
#   2. SFT and DPO in bf16: packed (sdpa), packed (flash-attention-2, if installed) and --packing False,
#      each with tokens/s and peak VRAM (torch.cuda.max_memory_allocated)
#   3. QLoRA: SFT of the 4-bit (NF4) model
#   4. DeepSpeed ZeRO-3 on one GPU (torchrun, --deepspeed zero3.json, full parameters): the saved folder loads
#      with transformers and answers through inference.py
#   5. FSDP through accelerate_fsdp.yaml on one GPU (LoRA): the adapter is saved whole
# and prints one summary table; exit status 1 if any check failed.
#   bash scripts/gpu_check.sh                      (creates .venv with setup_env.sh first if it is missing)
#   STEPS=40 OUT=/tmp/gpu-check bash scripts/gpu_check.sh
# Variables: STEPS optimizer steps per training run (default 30), OUT work folder (default outputs-gpu-check,
# emptied first), PYTHON interpreter (default .venv/bin/python), RUN_TIMEOUT seconds per run (default 240),
# BUDGET seconds for everything after the setup (default 480: checks that would start later are skipped).
# GPU_CHECK_ON_CPU=1 runs the same steps on a machine without CUDA (float32, no VRAM figures; for checking this
# script itself, with GPU_CHECK_MODEL=<a tiny model folder> to keep it short).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS

if [ -z "${GPU_CHECK_ON_CPU:-}" ] && ! command -v nvidia-smi >/dev/null 2>&1 && [ ! -e /dev/nvidiactl ]; then
  echo "error: gpu_check.sh needs a CUDA GPU and this machine has none (no nvidia-smi, no /dev/nvidiactl)" >&2
  exit 1
fi
if [ -z "${PYTHON:-}" ] && [ ! -x .venv/bin/python ]; then
  echo "== .venv missing: bash setup_env.sh"
  bash setup_env.sh || { echo "error: setup_env.sh failed (see above)" >&2; exit 1; }
fi
PY=${PYTHON:-.venv/bin/python}
if [ -z "${GPU_CHECK_ON_CPU:-}" ]; then
  if ! gpu=$("$PY" -c 'import torch, sys
if not torch.cuda.is_available():
    sys.exit(f"error: gpu_check.sh needs a CUDA GPU: torch {torch.__version__} sees none")
print(torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)' 2>&1); then
    echo "${gpu##*$'\n'}" >&2
    exit 1
  fi
  echo "== GPU: $gpu"
fi

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
STEPS=${STEPS:-30}
OUT=${OUT:-outputs-gpu-check}
RUN_TIMEOUT=${RUN_TIMEOUT:-240}
BUDGET=${BUDGET:-480}
if [ -d "$OUT" ] && [ -n "$(ls -A "$OUT")" ] && [ ! -f "$OUT/summary.tsv" ]; then
  echo "error: OUT=$OUT is a non-empty folder that gpu_check.sh did not write; choose another" >&2
  exit 1
fi
rm -rf "$OUT" && mkdir -p "$OUT/logs"
T0=$SECONDS
OUT=$(cd "$OUT" && pwd)
SUMMARY=$OUT/summary.tsv
printf 'check\tresult\ttokens/s\tpeak VRAM GiB\twall s\tnote\n' > "$SUMMARY"
MODEL=()
[ -n "${GPU_CHECK_MODEL:-}" ] && MODEL=(--model_name_or_path "$GPU_CHECK_MODEL")
HAVE_FLASH=$("$PY" -c 'import flash_attn' >/dev/null 2>&1 && echo 1 || echo "")
FAILED=0

# A stage run in-process under this wrapper writes its peak VRAM and wall time to $GPU_CHECK_METRICS.
WRAP=$OUT/wrap.py
cat > "$WRAP" <<'EOF'
import json, os, runpy, sys, time
import torch
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # the repository, for `import medgpt`
start, code = time.time(), 1
try:
    runpy.run_path(script, run_name="__main__")
    code = 0
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    raise
finally:
    if int(os.environ.get("RANK", "0")) == 0:
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        with open(os.environ["GPU_CHECK_METRICS"], "w") as f:
            json.dump({"peak_gib": peak, "wall_s": time.time() - start, "exit": code}, f)
EOF

# Tokens/s of a finished run: SFT reports its real (non-pad) tokens, DPO logs num_tokens; else samples/s.
METRICS=$OUT/metrics.py
cat > "$METRICS" <<'EOF'
import json, os, sys
out, metrics = sys.argv[1], sys.argv[2]
res = json.load(open(os.path.join(out, "train_results.json")))
m = json.load(open(metrics))
runtime = res.get("train_runtime") or 0
tokens = res.get("train_tokens_real")
if tokens is None and os.path.isfile(os.path.join(out, "trainer_state.json")):
    logged = [h["num_tokens"] for h in json.load(open(os.path.join(out, "trainer_state.json")))["log_history"]
              if "num_tokens" in h]
    tokens = logged[-1] if logged else None
tps = f"{tokens / runtime:.0f}" if tokens and runtime else f"{res.get('train_samples_per_second', 0)} samples/s"
peak = f"{m['peak_gib']:.2f}" if m.get("peak_gib") is not None else "-"
print(f"{tps}\t{peak}\t{m['wall_s']:.0f}\tloss {res.get('train_loss', float('nan')):.4f}")
EOF

row() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$SUMMARY"; }  # check, result, "tokens/s<TAB>peak<TAB>wall<TAB>note"

# time_left NAME: sets LIMIT (seconds this step may take); false, with a "skipped" row, when the budget is spent
time_left() {
  local left=$((BUDGET - (SECONDS - T0)))
  if [ $left -lt 30 ]; then
    row "$1" skipped "$(printf -- '-\t-\t-\tover the %ss budget' "$BUDGET")"
    echo "== $1: skipped (over the ${BUDGET}s budget)"
    FAILED=1
    return 1
  fi
  LIMIT=$((left < RUN_TIMEOUT ? left : RUN_TIMEOUT))
}

# train NAME [launcher...] -- script.py flags...: one training run, its log in $OUT/logs/NAME.log, one summary row
train() {
  local name=$1 launcher=() t0=$SECONDS
  shift
  while [ "$1" != "--" ]; do launcher+=("$1"); shift; done
  shift
  local out=$OUT/$name log=$OUT/logs/$name.log
  time_left "$name" || return 1
  echo "== $name"
  GPU_CHECK_METRICS=$OUT/logs/$name.json timeout -k 10 "$LIMIT" ${launcher[@]+"${launcher[@]}"} "$WRAP" "$@" \
    --output_dir "$out" --overwrite_output_dir --report_to none --save_strategy no --do_eval False --eval_strategy no \
    --max_steps "$STEPS" --logging_steps 5 --seed 42 ${MODEL[@]+"${MODEL[@]}"} > "$log" 2>&1
  local rc=$?
  if [ $rc -eq 0 ] && [ -f "$out/train_results.json" ]; then
    row "$name" ok "$("$PY" "$METRICS" "$out" "$OUT/logs/$name.json" 2>>"$log" || printf -- '-\t-\t%s\tno metrics' $((SECONDS - t0)))"
    return 0
  fi
  local why=$([ $rc -eq 124 ] && echo "timed out after ${LIMIT}s" || grep -E "(^|: )error: |(Error|Exception): " "$log" | grep -v ChildFailedError | tail -1 | cut -c1-120)
  row "$name" "FAILED (exit $rc)" "$(printf -- '-\t-\t%s\t%s' $((SECONDS - t0)) "${why:-see logs/$name.log}")"
  echo "   FAILED: $OUT/logs/$name.log" >&2
  FAILED=1
  return 1
}

# check NAME python-code: a pass/fail check whose last output line goes into the table
check() {
  local name=$1 code=$2 t0=$SECONDS log=$OUT/logs/$1.log
  time_left "$name" || return 1
  echo "== $name"
  timeout -k 10 "$LIMIT" "$PY" -c "$code" "${@:3}" > "$log" 2>&1
  local rc=$? last
  last=$(grep -v '^\s*$' "$log" | tail -1 | cut -c1-140)
  if [ $rc -eq 0 ]; then
    row "$name" ok "$(printf -- '-\t-\t%s\t%s' $((SECONDS - t0)) "$last")"
  else
    row "$name" "FAILED (exit $rc)" "$(printf -- '-\t-\t%s\t%s' $((SECONDS - t0)) "$last")"
    echo "   FAILED: $log" >&2
    FAILED=1
  fi
}

# --- 1. packed logits == each sample alone, on CUDA --------------------------------------------------------------
check packed-logits '
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from medgpt.data.collator import build_collator
from medgpt.default_model import resolve_model_path
path = resolve_model_path(sys.argv[1] or None)
device = "cuda" if torch.cuda.is_available() else "cpu"
tok = AutoTokenizer.from_pretrained(path)
texts = [json.loads(line)["messages"][-1]["content"] for line in open("data/finetune/medical_sft_messages.jsonl")][:6]
samples = []
for text in texts:
    ids = tok(text, add_special_tokens=False)["input_ids"][:200]
    samples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids})
n_tokens = sum(len(s["input_ids"]) for s in samples)
runs = [("sdpa", torch.float32), ("sdpa", torch.bfloat16)]
if sys.argv[2]:
    runs.append(("flash_attention_2", torch.bfloat16))
if device == "cpu":
    runs = runs[:1]
exact, notes = None, []
for impl, dtype in runs:
    name = f"{impl}/{str(dtype)[6:]}"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=impl).to(device).eval()
    collator, packed = build_collator(tok, model, packing=True)
    assert packed, f"{name}: medgpt refused to pack"
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collator(samples).items() if k != "labels"}
    with torch.no_grad():
        row = model(**batch).logits[0].float()
        alone = torch.cat([model(input_ids=torch.tensor([s["input_ids"]], device=device)).logits[0].float()
                           for s in samples])
    diff = (row - alone).abs()
    top1 = (row.argmax(-1) == alone.argmax(-1)).float().mean().item()
    if dtype == torch.float32:
        # float32: packed == alone up to float error
        exact = alone
        ok = diff.max().item() <= 1e-4 * max(alone.abs().max().item(), 1.0)
        bound = "max <= 1e-4 x max|logit|"
    else:
        # bf16: packing may add no more error than bf16 itself (bf16 alone vs float32 alone)
        noise = (alone - exact).abs().mean().item()
        ok = diff.mean().item() <= 2 * noise + 1e-6
        bound = f"mean <= 2 x bf16 rounding {noise:.2e}"
    verdict = "ok" if ok else "DIFFERENT"
    print(f"{name}: |packed - alone| max {diff.max().item():.2e} mean {diff.mean().item():.2e} ({bound}): "
          f"{verdict}; top-1 agreement {top1:.4f}")
    assert ok, f"{name}: packed logits differ from each sample alone"
    notes.append(f"{name} {diff.mean().item():.1e}")
    del model
print(f"{len(samples)} samples, {n_tokens} tokens; mean |diff| " + ", ".join(notes))
' "${GPU_CHECK_MODEL:-}" "$HAVE_FLASH"

# --- 2. SFT and DPO in bf16: packed sdpa, packed flash-attention-2, padded -----------------------------------------
BF16=(--torch_dtype bfloat16 --bf16 True)
SFT=(supervised_finetuning.py --train_file_dir data/finetune --do_train --template_name chatml
     --per_device_train_batch_size 8 --model_max_length 1024 --learning_rate 2e-4 --gradient_checkpointing False)
DPO=(dpo_training.py --train_file_dir data/reward --do_train --template_name chatml --per_device_train_batch_size 8
     --max_source_length 256 --max_target_length 256 --learning_rate 5e-5 --remove_unused_columns False
     --validation_split_percentage 0)
train sft-packed-sdpa "$PY" -- "${SFT[@]}" "${BF16[@]}" --packing True
[ -n "$HAVE_FLASH" ] && train sft-packed-flash2 "$PY" -- "${SFT[@]}" "${BF16[@]}" --packing True --flash_attn True
train sft-padded "$PY" -- "${SFT[@]}" "${BF16[@]}" --packing False
train dpo-packed-sdpa "$PY" -- "${DPO[@]}" "${BF16[@]}" --packing True
[ -n "$HAVE_FLASH" ] && train dpo-packed-flash2 "$PY" -- "${DPO[@]}" "${BF16[@]}" --packing True --flash_attn True
train dpo-padded "$PY" -- "${DPO[@]}" "${BF16[@]}" --packing False
[ -z "$HAVE_FLASH" ] && row "flash-attention-2" skipped "$(printf -- '-\t-\t-\tflash_attn not installed')"

# --- 3. QLoRA (4-bit NF4) SFT ------------------------------------------------------------------------------------
train sft-qlora-4bit "$PY" -- "${SFT[@]}" "${BF16[@]}" --load_in_4bit True --qlora True

# --- 4. ZeRO-3 on one GPU, full parameters, and a loadable save -------------------------------------------------
if train sft-zero3 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -- \
    "${SFT[@]}" "${BF16[@]}" --deepspeed zero3.json --use_peft False --learning_rate 1e-5; then
  check zero3-save-loads '
import sys, torch
from transformers import AutoModelForCausalLM
from medgpt.default_model import resolve_model_path
out, base = sys.argv[1], resolve_model_path(sys.argv[2] or None)
saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
orig = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict()
assert set(saved) == set(orig), f"keys differ: {sorted(set(saved) ^ set(orig))[:5]}"
bad = [k for k in orig if saved[k].shape != orig[k].shape]
assert not bad, f"shapes differ: {bad[:5]}"
assert all(torch.isfinite(v).all() for v in saved.values()), "non-finite weights"
changed = sum(not torch.equal(saved[k], orig[k]) for k in orig)
assert changed, "no weight changed"
print(f"{len(saved)} tensors, shapes as the base model, {changed} changed by training")
' "$OUT/sft-zero3" "${GPU_CHECK_MODEL:-}"
  check zero3-inference '
import subprocess, sys
p = subprocess.run([sys.executable, "inference.py", "--base_model", sys.argv[1], "--with_prompt", "--prompt",
                    "What are the symptoms of anemia?", "--max_new_tokens", "24"], capture_output=True, text=True)
sys.stdout.write(p.stdout[-1500:] + p.stderr[-1500:])
assert p.returncode == 0, f"inference.py exited {p.returncode}"
answer = " ".join(p.stdout.split())[-100:]
assert answer, "no answer"
print(f"inference.py answered: {answer}")
' "$OUT/sft-zero3"
fi

# --- 5. FSDP (accelerate_fsdp.yaml) on one GPU: LoRA, and the adapter it saves (FULL_STATE_DICT) -------------------
if train sft-fsdp "$PY" -m accelerate.commands.launch --config_file accelerate_fsdp.yaml --num_processes 1 -- \
    "${SFT[@]}" "${BF16[@]}"; then
  check fsdp-save-loads '
import sys
from safetensors.torch import load_file
weights = load_file(sys.argv[1] + "/adapter_model.safetensors")
empty = [k for k, v in weights.items() if v.numel() == 0]
assert weights and not empty, f"empty tensors in the saved adapter: {empty[:3]}"
print(f"adapter: {len(weights)} tensors, {sum(v.numel() for v in weights.values())} weights")
' "$OUT/sft-fsdp"
fi

echo
echo "== summary ($((SECONDS - START)) s in all; logs in $OUT/logs)"
column -t -s $'\t' "$SUMMARY"
exit $FAILED

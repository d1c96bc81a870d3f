# Sourced by the run_*.sh scripts: the Python to use and the torchrun launch, written once.
#   PYTHON       interpreter (default: .venv/bin/python if present, else python3)
#   NPROC        processes per node (default: the number of visible GPUs, or 1 on a CPU machine); one process on
#                one machine without DeepSpeed/FSDP runs as plain python, anything else through torchrun
#   NNODES       machines in the run (default 1). Above 1, start the same command on every machine, each with its
#                own NODE_RANK; they meet at MASTER_ADDR:MASTER_PORT (node 0's address):
#                  node 0:  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC=8 bash run_sft.sh ...
#                  node 1:  NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC=8 bash run_sft.sh ...
#   NODE_RANK    this machine's rank, 0 .. NNODES-1 (default 0)
#   MASTER_ADDR  address of node 0 (default 127.0.0.1)
#   MASTER_PORT  rendezvous port (multi-node default 29500). Unset on one node: torchrun --standalone picks a free
#                port on this machine, so runs never collide
#   DEEPSPEED    a DeepSpeed config (zero1.json, zero2.json, zero3.json, zero3_offload.json): appended to the flags as
#                --deepspeed $DEEPSPEED (so it wins over a --deepspeed given on the command line)
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

# The flags every training run_*.sh passes first (MedicalGPT's run scripts repeat them in each file). The script's
# own flags come after them and yours after those, and the last occurrence of a flag wins, so any of these can be
# overridden: bash run_sft.sh --lora_rank 16 --report_to none --use_peft False
RUN_FLAGS=(--overwrite_output_dir --ddp_timeout 30000 --logging_first_step True --torch_dtype float32 --device_map auto
           --report_to tensorboard --ddp_find_unused_parameters False --gradient_checkpointing False --cache_dir ./cache)
LORA_FLAGS=(--use_peft True --target_modules all --lora_rank 8 --lora_alpha 16 --lora_dropout 0.05)
# The preference stages' (run_dpo.sh, run_orpo.sh, run_cpo.sh) shared defaults: data/reward, a 10% held-out split, 12
# steps of 2 pairs at learning rate 2e-4 (cosine, 2 warm-up steps), prompts and replies cut at 128 tokens each
PAIR_FLAGS=(--train_file_dir ./data/reward --validation_split_percentage 10 --per_device_train_batch_size 2
            --per_device_eval_batch_size 4 --gradient_accumulation_steps 1 --do_train --do_eval --template_name chatml
            --max_train_samples 1000 --max_eval_samples 10 --max_steps 12 --learning_rate 2e-4 --warmup_steps 2
            --lr_scheduler_type cosine --logging_strategy steps --logging_steps 2 --eval_steps 50 --eval_strategy steps
            --save_steps 50 --save_strategy steps --save_total_limit 3 --max_source_length 128 --max_target_length 128)

# _check_deepspeed CONFIG: one line on stderr and status 2 when CONFIG is not a readable DeepSpeed JSON file (or inline
# JSON), before torchrun starts (from there every rank would print the error and torchrun a page of traceback).
_check_deepspeed() {
  case "$1" in
    "{"*) ;;
    *) if [ ! -f "$1" ]; then
         echo "error: --deepspeed $1: no such file (the repository has zero1.json, zero2.json, zero3.json and zero3_offload.json)" >&2
         return 2
       fi ;;
  esac
  local msg
  if ! msg=$("$PYTHON" -c 'import sys
from medgpt.distributed import check_deepspeed_config
check_deepspeed_config(sys.argv[1])' "$1" 2>&1); then
    echo "${msg##*$'\n'}" >&2  # its last line: "error: <file>:<line>: ..."
    return 2
  fi
}

# launch script.py [flags...]
launch() {
  local script=$1 extra=() ds="" i
  shift
  if [ -n "${DEEPSPEED:-}" ]; then
    extra=(--deepspeed "$DEEPSPEED")
    ds=$DEEPSPEED
  else
    for ((i = 1; i <= $#; i++)); do  # the last --deepspeed on the command line is the one used
      case "${!i}" in
        --deepspeed) local j=$((i + 1)); ds=${!j:-} ;;
        --deepspeed=*) ds=${!i#*=} ;;
      esac
    done
  fi
  if [ -n "$ds" ]; then
    _check_deepspeed "$ds" || return 2
  fi
  if [ -z "${NPROC:-}" ]; then
    if ls /dev/nvidia[0-9]* /dev/kfd >/dev/null 2>&1; then  # GPU device files: ask torch how many it can use
      NPROC=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
    else  # none: no CUDA/ROCm device is visible, one process (and no 2 s torch import to find that out)
      NPROC=1
    fi
  fi
  local nnodes=${NNODES:-1} rdzv
  # One process on one machine, no DeepSpeed or FSDP: plain python, as `python supervised_finetuning.py ...` runs
  # (torchrun would only add a 2-3 s launcher process and a one-process group; every stage of run_pipeline.sh
  # pays that once)
  if [ "$NPROC" = 1 ] && [ "$nnodes" = 1 ] && [ -z "${MASTER_PORT:-}" ] && [ -z "$ds" ] \
      && [[ " $* " != *" --fsdp"* ]]; then
    "$PYTHON" "$script" "$@"
    return
  fi
  if [ "$nnodes" != 1 ]; then
    rdzv=(--nnodes "$nnodes" --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}"
          --master_port "${MASTER_PORT:-29500}")
  elif [ -n "${MASTER_PORT:-}" ]; then
    rdzv=(--master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "$MASTER_PORT")
  else
    rdzv=(--standalone)
  fi
  "$PYTHON" -m torch.distributed.run "${rdzv[@]}" --nproc_per_node "$NPROC" "$script" "$@" ${extra[@]+"${extra[@]}"}
}

# Sourced by the run_*.sh scripts: the Python to use and the torchrun launch, written once.
#   PYTHON   interpreter (default: .venv/bin/python if present, else python3)
#   NPROC    processes per node (default: the number of visible GPUs, or 1 on a CPU machine)
#   MASTER_PORT  rendezvous port; unset: torchrun --standalone picks a free port on this machine, so
#                runs never collide (set it, with MASTER_ADDR, for a multi-node launch)
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

# The flags every training run_*.sh passes first (MedicalGPT's run scripts repeat them in each file). The script's
# own flags come after them and yours after those, and the last occurrence of a flag wins, so any of these can be
# overridden: bash run_sft.sh --lora_rank 16 --report_to none --use_peft False
RUN_FLAGS=(--overwrite_output_dir --ddp_timeout 30000 --logging_first_step True --torch_dtype float32 --device_map auto
           --report_to tensorboard --ddp_find_unused_parameters False --gradient_checkpointing False --cache_dir ./cache)
LORA_FLAGS=(--use_peft True --target_modules all --lora_rank 8 --lora_alpha 16 --lora_dropout 0.05)

# launch script.py [flags...]
launch() {
  if [ -z "${NPROC:-}" ]; then
    NPROC=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
  fi
  if [ -n "${MASTER_PORT:-}" ]; then
    "$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC" --master_port "$MASTER_PORT" "$@"
  else
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" "$@"
  fi
}

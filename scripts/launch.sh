# Sourced by the run_*.sh scripts: the Python to use and the torchrun launch, written once.
#   PYTHON   interpreter (default: .venv/bin/python if present, else python3)
#   NPROC    processes per node (default: the number of visible GPUs, or 1 on a CPU machine)
#   MASTER_PORT  rendezvous port; unset: torchrun --standalone picks a free port on this machine, so
#                runs never collide (set it, with MASTER_ADDR, for a multi-node launch)
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

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

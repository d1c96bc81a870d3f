# Sourced by the run_*.sh scripts: the Python to use and the torchrun launch, written once.
#   PYTHON   interpreter (default: .venv/bin/python if present, else python3)
#   NPROC    processes per node (default: the number of visible GPUs, or 1 on a CPU machine)
#   MASTER_PORT  rendezvous port (default: one per script, so two stages can run side by side)
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

# launch DEFAULT_PORT script.py [flags...]
launch() {
  local port=$1
  shift
  if [ -z "${NPROC:-}" ]; then
    NPROC=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
  fi
  "$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC" --master_port "${MASTER_PORT:-$port}" "$@"
}

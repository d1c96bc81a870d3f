#!/usr/bin/env bash
# Stage 3 (RLHF): PPO of the SFT model against the reward model, with MedicalGPT's flags.
#   CPU / laptop:   bash run_sft.sh && bash run_rm.sh && bash run_ppo.sh      (embedded SmolLM2-135M-Instruct)
#   Other inputs:   SFT_MODEL=outputs-sft-qwen REWARD_MODEL=outputs-rm-qwen bash run_ppo.sh --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --template_name qwen
#                   (or pass --sft_model_path / --reward_model_path yourself)
#   GPU node:       NPROC=8 bash run_ppo.sh --batch_size 64 --mini_batch_size 16 --response_length 256 --max_steps 200 --torch_dtype bfloat16
#                   (one policy: each process rolls out --batch_size/NPROC prompts; both sizes multiples of NPROC)
#   DeepSpeed:      DEEPSPEED=zero2.json NPROC=8 bash run_ppo.sh ...   (zero1.json or zero2.json; PPO refuses ZeRO-3)
#   Multi-node:     NNODES=2 NODE_RANK=0 MASTER_ADDR=<node 0 address> MASTER_PORT=29500 NPROC=8 bash run_ppo.sh ...
#                   on node 0, the same with NODE_RANK=1 on node 1 (scripts/launch.sh lists the variables)
# The SFT output may be a LoRA adapter (PPO continues it; the result is an adapter for inference.py --lora_model)
# or a full/merged model. It launches through torchrun like the other stages: one process on a CPU machine, one per
# visible GPU on a GPU node (NPROC=1 for a single process there). The defaults below take 3-6 minutes on a 2-core
# CPU; on a CPU busy with other jobs, OMP_NUM_THREADS=1 bash run_ppo.sh is much faster (two threads per process
# then wait on each other).
set -euo pipefail
cd "$(dirname "$0")"
. scripts/launch.sh
SFT_MODEL=${SFT_MODEL:-outputs-sft-v1}
REWARD_MODEL=${REWARD_MODEL:-outputs-rm-v1}
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do  # flags given on the command line win over the defaults
  case "${args[i]}" in
    --sft_model_path) SFT_MODEL=${args[i + 1]:-} ;;
    --sft_model_path=*) SFT_MODEL=${args[i]#*=} ;;
    --reward_model_path|--reward_model_name_or_path) REWARD_MODEL=${args[i + 1]:-} ;;
    --reward_model_path=*|--reward_model_name_or_path=*) REWARD_MODEL=${args[i]#*=} ;;
  esac
done
if [ ! -d "$SFT_MODEL" ]; then
  echo "error: SFT model '$SFT_MODEL' not found: run 'bash run_sft.sh' first, or set SFT_MODEL=<folder> / pass --sft_model_path <folder>" >&2
  exit 2
fi
if [ ! -d "$REWARD_MODEL" ]; then
  echo "error: reward model '$REWARD_MODEL' not found: run 'bash run_rm.sh' first, or set REWARD_MODEL=<folder> / pass --reward_model_path <folder>" >&2
  exit 2
fi
launch ppo_training.py \
    --sft_model_path "$SFT_MODEL" \
    --reward_model_path "$REWARD_MODEL" \
    --train_file_dir ./data/finetune \
    --max_source_length 256 \
    --response_length 64 \
    --batch_size 8 \
    --mini_batch_size 4 \
    --per_device_train_batch_size 4 \
    --num_ppo_epochs 2 \
    --total_episodes 1000 \
    --max_steps 10 \
    --kl_coef 0.05 \
    --temperature 0.7 \
    --learning_rate 5e-5 \
    --use_peft True \
    --torch_dtype float32 \
    --logging_steps 1 \
    --save_steps 50 \
    --output_dir outputs-ppo-v1 \
    --report_to tensorboard \
    --seed 42 \
    "$@"

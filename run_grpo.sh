#!/usr/bin/env bash
# GRPO (R1-style RL with rule rewards: answer match + <think>/<answer> format) with MedicalGPT's flags.
#   CPU / laptop:      bash run_grpo.sh                (embedded SmolLM2-135M-Instruct, data/grpo, a few minutes)
#   From an SFT LoRA:  bash run_grpo.sh --peft_path outputs-sft-v1
#   GPU node:          NPROC=2 CUDA_VISIBLE_DEVICES=0,1 bash run_grpo.sh --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct --template_name qwen --torch_dtype bfloat16 --bf16 True --max_steps -1 --num_train_epochs 1 --max_completion_length 512
#   DeepSpeed:         DEEPSPEED=zero2.json NPROC=8 bash run_grpo.sh ...   (= --deepspeed zero2.json; zero1.json, zero3.json,
#                      zero3_offload.json: ZeRO-3 with optimizer and weights offloaded to CPU RAM)
#   Multi-node (2x8):  NNODES=2 NODE_RANK=0 MASTER_ADDR=<node 0 address> MASTER_PORT=29500 NPROC=8 bash run_grpo.sh ...
#                      on node 0, the same with NODE_RANK=1 on node 1 (scripts/launch.sh lists the variables)
# Extra flags are appended and override the defaults below. Without CUDA, --bf16 trains in bf16 where the CPU
# has native bf16, else float32; generation uses transformers (no vLLM needed). About 4-5 minutes on a 2-core CPU;
# on a CPU busy with other jobs, OMP_NUM_THREADS=1 bash run_grpo.sh is much faster.
set -euo pipefail
cd "$(dirname "$0")"
. scripts/launch.sh
launch grpo_training.py \
    --train_file_dir ./data/grpo \
    --train_samples -1 \
    --max_steps 10 \
    --num_train_epochs 1 \
    --save_steps 50 \
    --save_strategy steps \
    --save_total_limit 3 \
    --output_dir outputs-grpo-v1 \
    --overwrite_output_dir \
    --torch_dtype float32 \
    --report_to tensorboard \
    --remove_unused_columns False \
    --gradient_checkpointing False \
    --beta 0.001 \
    --learning_rate 5e-5 \
    --lr_scheduler_type cosine \
    --warmup_ratio 0.03 \
    --use_vllm False \
    --logging_steps 1 \
    --use_peft True \
    --target_modules all \
    --lora_rank 16 \
    --lora_alpha 32 \
    --lora_dropout 0.1 \
    --per_device_train_batch_size 4 \
    --gradient_accumulation_steps 1 \
    --num_generations 4 \
    --max_completion_length 96 \
    --seed 42 \
    "$@"

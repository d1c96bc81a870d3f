#!/usr/bin/env bash
# Stage 3: reward model (LoRA + a scalar `score` head) on chosen/rejected pairs, with MedicalGPT's flags.
#   CPU / laptop:   bash run_rm.sh                 (embedded SmolLM2-135M-Instruct, data/reward; a few minutes)
#   From SFT:       bash run_rm.sh --model_name_or_path merged-sft      (a merged SFT folder, see merge_peft_adapter.py)
#   GPU node:       NPROC=8 bash run_rm.sh --model_name_or_path Qwen/Qwen2.5-7B-Instruct --template_name qwen --torch_dtype bfloat16 --bf16 --max_source_length 1024 --max_target_length 256
#   DeepSpeed:         DEEPSPEED=zero2.json NPROC=8 bash run_rm.sh ...   (= --deepspeed zero2.json; zero1.json, zero3.json,
#                      zero3_offload.json: ZeRO-3 with optimizer and weights offloaded to CPU RAM)
#   Multi-node (2x8):  NNODES=2 NODE_RANK=0 MASTER_ADDR=<node 0 address> MASTER_PORT=29500 NPROC=8 bash run_rm.sh ...
#                      on node 0, the same with NODE_RANK=1 on node 1 (scripts/launch.sh lists the variables)
# Extra flags are appended and override the defaults below. The output scores replies with
# medgpt.reward.RewardScorer (used by run_ppo.sh). Without CUDA: float32, or bf16 with --torch_dtype bfloat16 --bf16 on a CPU with native bf16.
set -euo pipefail
cd "$(dirname "$0")"
. scripts/launch.sh
launch reward_modeling.py \
    "${RUN_FLAGS[@]}" "${LORA_FLAGS[@]}" \
    --train_file_dir ./data/reward \
    --validation_split_percentage 10 \
    --per_device_train_batch_size 4 \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps 1 \
    --do_train \
    --do_eval \
    --template_name chatml \
    --seed 42 \
    --max_train_samples 1000 \
    --max_eval_samples 10 \
    --num_train_epochs 1 \
    --learning_rate 2e-4 \
    --warmup_steps 2 \
    --weight_decay 0.001 \
    --logging_strategy steps \
    --logging_steps 2 \
    --eval_steps 50 \
    --eval_strategy steps \
    --save_steps 500 \
    --save_strategy steps \
    --save_total_limit 3 \
    --max_source_length 128 \
    --max_target_length 128 \
    --output_dir outputs-rm-v1 \
    --remove_unused_columns False \
    "$@"

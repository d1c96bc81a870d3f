#!/usr/bin/env bash
# Stage 2: supervised fine-tuning (LoRA) with MedicalGPT's flags.
#   CPU / laptop:      bash run_sft.sh                 (embedded SmolLM2-135M-Instruct, data/finetune)
#   GPU node:          NPROC=8 CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 bash run_sft.sh --model_name_or_path Qwen/Qwen2.5-7B-Instruct --template_name qwen --torch_dtype bfloat16 --bf16
#   DeepSpeed:         DEEPSPEED=zero2.json NPROC=8 bash run_sft.sh ...   (= --deepspeed zero2.json; zero1.json, zero3.json,
#                      zero3_offload.json: ZeRO-3 with optimizer and weights offloaded to CPU RAM)
#   FSDP:              accelerate launch --config_file accelerate_fsdp.yaml --num_processes 8 supervised_finetuning.py ...
#   Multi-node (2x8):  NNODES=2 NODE_RANK=0 MASTER_ADDR=<node 0 address> MASTER_PORT=29500 NPROC=8 bash run_sft.sh ...
#                      on node 0, the same with NODE_RANK=1 on node 1 (scripts/launch.sh lists the variables)
# Extra flags are appended and override the defaults below. Without CUDA, --torch_dtype bfloat16 --bf16 train in
# bf16 where the CPU has native bf16 (AVX512-BF16/AMX), else float32 (the log says which and why).
set -euo pipefail
cd "$(dirname "$0")"
. scripts/launch.sh
launch supervised_finetuning.py \
    "${RUN_FLAGS[@]}" "${LORA_FLAGS[@]}" \
    --train_file_dir ./data/finetune \
    --validation_file_dir ./data/finetune \
    --per_device_train_batch_size 4 \
    --per_device_eval_batch_size 4 \
    --do_train \
    --do_eval \
    --template_name chatml \
    --max_train_samples 1000 \
    --max_eval_samples 10 \
    --model_max_length 512 \
    --num_train_epochs 1 \
    --learning_rate 2e-4 \
    --warmup_ratio 0.05 \
    --weight_decay 0.05 \
    --logging_strategy steps \
    --logging_steps 5 \
    --eval_steps 50 \
    --evaluation_strategy steps \
    --save_steps 500 \
    --save_strategy steps \
    --save_total_limit 3 \
    --gradient_accumulation_steps 1 \
    --preprocessing_num_workers 1 \
    --output_dir outputs-sft-v1 \
    "$@"

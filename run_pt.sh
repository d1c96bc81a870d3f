#!/usr/bin/env bash
# Stage 1: continued pretraining (LoRA) on raw domain text, with MedicalGPT's flags.
#   CPU / laptop:      bash run_pt.sh                  (embedded SmolLM2-135M-Instruct, data/pretrain, a few minutes)
#   GPU node:          NPROC=8 CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 bash run_pt.sh --model_name_or_path Qwen/Qwen2.5-0.5B --block_size 1024 --torch_dtype bfloat16 --bf16
#   Full parameters:   bash run_pt.sh --use_peft False --learning_rate 2e-5
#   DeepSpeed:         DEEPSPEED=zero2.json NPROC=8 bash run_pt.sh ...   (= --deepspeed zero2.json; zero1.json, zero3.json,
#                      zero3_offload.json: ZeRO-3 with optimizer and weights offloaded to CPU RAM)
#   Multi-node (2x8):  NNODES=2 NODE_RANK=0 MASTER_ADDR=<node 0 address> MASTER_PORT=29500 NPROC=8 bash run_pt.sh ...
#                      on node 0, the same with NODE_RANK=1 on node 1 (scripts/launch.sh lists the variables)
# Extra flags are appended and override the defaults below. Without CUDA, --torch_dtype bfloat16 --bf16 train in
# bf16 where the CPU has native bf16 (AVX512-BF16/AMX), else float32 (the log says which and why). 10% of the documents are held out for the eval loss and
# perplexity (MedicalGPT evaluates on --validation_file_dir ./data/pretrain, i.e. on the training text;
# pass that flag to do the same).
set -euo pipefail
cd "$(dirname "$0")"
. scripts/launch.sh
launch pretraining.py \
    "${RUN_FLAGS[@]}" "${LORA_FLAGS[@]}" \
    --train_file_dir ./data/pretrain \
    --validation_split_percentage 10 \
    --per_device_train_batch_size 4 \
    --per_device_eval_batch_size 4 \
    --do_train \
    --do_eval \
    --seed 42 \
    --max_train_samples 10000 \
    --max_eval_samples 10 \
    --num_train_epochs 0.5 \
    --learning_rate 2e-4 \
    --warmup_ratio 0.05 \
    --weight_decay 0.01 \
    --logging_strategy steps \
    --logging_steps 2 \
    --eval_steps 50 \
    --eval_strategy steps \
    --save_steps 50 \
    --save_strategy steps \
    --save_total_limit 3 \
    --gradient_accumulation_steps 1 \
    --preprocessing_num_workers 1 \
    --block_size 128 \
    --packing True \
    --output_dir outputs-pt-v1 \
    "$@"

#!/usr/bin/env bash
# Stage 3 without a reference model: CPO (default) or SimPO (--loss_type simpo --cpo_alpha 0), LoRA, on
# chosen/rejected pairs, with the flags of run_orpo.sh (MedicalGPT's) plus CPOConfig's.
#   CPU / laptop:   bash run_cpo.sh                 (embedded SmolLM2-135M-Instruct, data/reward; a few minutes)
#   SimPO:          bash run_cpo.sh --loss_type simpo --cpo_alpha 0 --beta 2.0 --simpo_gamma 0.5 --output_dir outputs-simpo-v1
#   From SFT:       bash run_cpo.sh --peft_path outputs-sft-v1           (continue the SFT adapter)
#                   bash run_cpo.sh --model_name_or_path merged-sft      (a merged SFT folder)
#   GPU node:       NPROC=8 bash run_cpo.sh --model_name_or_path Qwen/Qwen2.5-7B-Instruct --template_name qwen --torch_dtype bfloat16 --bf16 --max_source_length 1024 --max_target_length 512 --per_device_train_batch_size 4 --gradient_accumulation_steps 8 --max_steps 100
#   DeepSpeed:         DEEPSPEED=zero2.json NPROC=8 bash run_cpo.sh ...   (= --deepspeed zero2.json; zero1.json, zero3.json,
#                      zero3_offload.json)
#   Multi-node (2x8):  NNODES=2 NODE_RANK=0 MASTER_ADDR=<node 0 address> MASTER_PORT=29500 NPROC=8 bash run_cpo.sh ...
#                      on node 0, the same with NODE_RANK=1 on node 1 (scripts/launch.sh lists the variables)
# Extra flags are appended and override the defaults below. The output adapter is used with
# inference.py --lora_model outputs-cpo-v1. Without CUDA: float32, or bf16 with --torch_dtype bfloat16 --bf16 on a CPU with native bf16.
set -euo pipefail
cd "$(dirname "$0")"
. scripts/launch.sh
launch cpo_training.py \
    "${RUN_FLAGS[@]}" "${LORA_FLAGS[@]}" "${PAIR_FLAGS[@]}" \
    --beta 0.1 \
    --output_dir outputs-cpo-v1 \
    --remove_unused_columns False \
    "$@"

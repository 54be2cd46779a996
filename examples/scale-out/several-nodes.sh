#!/usr/bin/env bash
# Several nodes: on paper only (tuneloop's tests run on one machine).
#
# Each serving node runs one vLLM server that tuneloop attaches to; tuneloop (one server: the
# feedback store is one DuckDB file that one process owns) runs on a node of its own with the
# data dir. Every node must see the data dir at the same path (a shared file system): the
# replicas load each version's adapter from `<data-dir>/versions/...` and resolve the names
# tuneloop publishes in `<data-dir>/vllm/adapters/` (vLLM's filesystem LoRA resolver).
set -euo pipefail
DATA=/shared/tuneloop-data
MODEL="$(tuneloop model smollm2)"   # or your base model's dir, on the shared file system

# On each serving node (here node1 and node2, 4 GPUs each, TP 4), with vLLM's own environment:
#   VLLM_ALLOW_RUNTIME_LORA_UPDATING=True VLLM_SERVER_DEV_MODE=1 \
#   VLLM_LORA_RESOLVER_CACHE_DIR=$DATA/vllm/adapters VLLM_API_KEY=$KEY \
#   python -m vllm.entrypoints.openai.api_server --model "$MODEL" --served-model-name base \
#     --tensor-parallel-size 4 --enable-lora --max-lora-rank 64 --host 10.0.0.11 --port 8000
# Keep those ports on a private network: vLLM's admin routes ignore its API key.

# On the tuneloop node (with GPUs of its own for training): attach to both; a promotion loads
# each version on both, or on neither.
exec tuneloop up --data-dir "$DATA" --model "$MODEL" --engine vllm \
  --vllm-url http://10.0.0.11:8000 --vllm-url http://10.0.0.12:8000 --vllm-api-key "$KEY" \
  --schedule --launcher accelerate --accelerate-config examples/accelerate/multi_gpu.yaml
# Training jobs run on the tuneloop node only: a job over several machines (accelerate's
# num_machines > 1) would need `accelerate launch` started on each, which tuneloop does not do.

# More front ends (one per node, behind your load balancer), each recording into the primary's
# store: copy the primary's <data-dir>/gateway.token to them (mode 0600), then on each:
#   tuneloop gateway --primary http://10.0.0.10:7860 --gateway-token-file gateway.token \
#     --engine vllm --vllm-url http://10.0.0.11:8000 --vllm-url http://10.0.0.12:8000 \
#     --vllm-api-key "$KEY" --host 0.0.0.0 --port 7870
# (the primary must then listen on the private network: `tuneloop up --host 10.0.0.10`).

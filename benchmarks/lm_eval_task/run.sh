#!/usr/bin/env bash
# Evaluate a running `jisu serve` with lm-eval-harness on the two local tasks of this folder.
#   jisu serve --port 8000 &             # in another shell (binds 127.0.0.1)
#   bash benchmarks/lm_eval_task/run.sh  # needs `pip install lm-eval`; extra arguments go to lm_eval
# The server's /tokenize and /tokenizer_info endpoints (vLLM-compatible) are lm-eval's tokenizer
# (tokenizer_backend=remote), so nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-python}
URL=${URL:-http://127.0.0.1:8000/v1/completions}
MODEL=${MODEL:-smollm2}
HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 "$PY" -m lm_eval --model local-completions \
  --model_args "model=$MODEL,base_url=$URL,tokenizer_backend=remote,num_concurrent=4,max_retries=1,tokenized_requests=True" \
  --include_path . --tasks jisu_mc,jisu_gen --batch_size 1 "$@"

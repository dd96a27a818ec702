#!/usr/bin/env bash
# Issue 3 evidence: every method on SemEval, FewRel, BoolQ and SQuAD with SmolLM2-135M, bf16-mixed,
# seed 42, a fixed small budget (50 steps x batch 8 = 400 training examples), scored on the first 256
# examples of each test split (SemEval test, FewRel held-out test, BoolQ dev, SQuAD test articles).
# The final weights are tested (no checkpoint selection). Rows -> benchmarks/results/re_qa_grid.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/re_qa_grid.json}
COMMON=(--trainer.logger.init_args.save_dir=outputs/re_qa_grid --trainer.enable_progress_bar=false
        --trainer.max_steps=50 --trainer.val_check_interval=50 --trainer.limit_val_batches=2
        --data.init_args.batch_size=8 --data.init_args.bucket_by_length=false)  # recorded before bucketing existed
for task in ${TASKS:-semeval fewrel boolq squad}; do
  if [ "$task" = squad ]; then limit=16; else limit=8; fi  # eval batch 16 for SQuAD, 32 elsewhere
  runs=("configs/$task/hard_prompt.yaml:test")
  for m in soft_prompt prefix_tuning p_tuning fine_tuning; do runs+=("configs/$task/$m.yaml:fit+test"); done
  runs+=("configs/$task/hard_prompt.yaml:fit+test:--model.init_args.tune_backbone=true")
  python benchmarks/run_configs.py --out "$OUT" "${runs[@]}" -- "${COMMON[@]}" --trainer.limit_test_batches=$limit
done

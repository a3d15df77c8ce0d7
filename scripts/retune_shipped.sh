#!/usr/bin/env bash
# Re-tune the shipped records for this machine at the sizes models serve (prefill 2048 and 8192,
# decoding 1 query against 8192 keys), batch 1, 8 heads, float32, all cores, quick effort
# (12 configs or 60 s per bucket). Run it on an idle machine: it prints the load before and after.
# Usage: scripts/retune_shipped.sh OUT.db [SPEC ...]   (then: attncc db export --db OUT.db FILE.jsonl)
set -euo pipefail
db=${1:?usage: retune_shipped.sh OUT.db [SPEC ...]}
shift
specs=${*:-sliding_window document_mask causal dense}
cd "$(dirname "$0")/.."
echo "load before: $(uptime)"
for s in $specs; do
  for b in torch numpy; do
    for shape in "--seq 2048" "--seq 8192" "--seq 1 --seq-k 8192"; do
      [ "$s" = document_mask ] && [ "$shape" = "--seq 1 --seq-k 8192" ] && continue
      echo "== $s $b $shape"
      ATTNCC_SHIPPED_DB=/dev/null attncc tune "examples/$s.yaml" --backend "$b" $shape \
        --batch 1 --heads 8 --effort quick --db "$db" --quiet --seed 0
    done
  done
done
echo "load after: $(uptime)"

#!/usr/bin/env bash
# The GPU smoke test: one line per check, PASS / FAIL / SKIP with its seconds, exit 1 if any failed.
#   bash tools/gpu_smoke.sh              every check; the CUDA ones print SKIP(no CUDA) without a GPU
#   bash tools/gpu_smoke.sh --cpu-only   only the checks a CPU machine can run (the test suite runs this)
# CPU part: the installed stack and its version guard, a planner topology for 2 hosts x 8 GPUs, a tiny
# train killed and resumed (gloo, through the CLI), infer and compress (AFM and SVD) from it, export,
# FBGEMM's fused TBE kernel on the CPU (the same check as on CUDA). CUDA part, on every visible GPU:
# the fused TBE kernel, the NCCL collectives, train killed and resumed (NCCL, DCP checkpoints), torchrec's
# train pipeline against the synchronous loop (pinned batches, side streams), infer, compress, export
# from the GPU checkpoint, samples/s and GPU utilisation. PYTHON (default
# .venv/bin/python) runs everything; SMOKE_DIR keeps the work directory (default: a temporary one,
# removed at the end).
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
cpu_only=0
[ "${1:-}" = "--cpu-only" ] && cpu_only=1
work=${SMOKE_DIR:-$(mktemp -d)}
[ -n "${SMOKE_DIR:-}" ] || trap 'rm -rf "$work"' EXIT
mkdir -p "$work"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
recipe=configs/synthetic.yaml
failures=0

report() {  # STATUS NAME SECONDS DETAIL
  printf '%-16s %-40s %7s s  %s\n' "$1" "$2" "$3" "$4"
}

check() {  # NAME COMMAND...: PASS when the command exits 0; the detail is its last output line
  local name=$1 start end output status
  shift
  start=$EPOCHREALTIME
  if output=$("$@" 2>&1); then status=PASS; else status=FAIL; failures=$((failures + 1)); fi
  end=$EPOCHREALTIME
  report "$status" "$name" "$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')" \
      "$(printf '%s\n' "$output" | grep -v '^[[:space:]]*$' | tail -1)"
  [ "$status" = PASS ] || printf '%s\n' "$output" | tail -20 | sed 's/^/    | /' >&2
}

skip() {  # NAME
  report "SKIP(no CUDA)" "$1" "-" ""
}

cli() { "$python" -m recsys_kd.cli "$@"; }

stack() {
  "$python" -c 'from recsys_kd.stack import check_stack; print(check_stack().describe())'
}

planner_topology() {  # a 2x8 plan: table-row-wise shards stay on one host
  printf 'name: smoke\ndense: [x]\nsparse: {a: 2000000, b: 500000, c: 1000}\n' > "$work/sizes.yaml"
  cli plan -c "$recipe" --world-size 16 --local-world-size 8 --device cuda --hbm-gb 80 --host-memory-gb 1024 \
      --sizes "$work/sizes.yaml" train.sharding.type=table_row_wise > "$work/plan.txt" || return 1
  grep -q "16 ranks = 2 hosts x 8" "$work/plan.txt" || return 1
  # every table's ranks are 0-7 or 8-15: one host each
  awk '/^t_/ { if ($6 != "0-7" && $6 != "8-15") bad = 1; n++ } END { exit (bad || n != 3) }' "$work/plan.txt" || return 1
  echo "3 table-row-wise tables, each on the 8 ranks of one host"
}

prepare() {
  cli prepare -c "$recipe" prepare.synthetic.rows=20000 "prepare.output=$work/data" prepare.progress=false | tail -1
}

train_kill_resume() {  # OUTPUT BACKEND LAUNCHER...: train, SIGKILL after the first checkpoint, rerun, check it resumed
  local output=$1 backend=$2
  shift 2
  local args=(train -c "$recipe" "prepare.output=$work/data" "train.output=$output" "train.backend=$backend"
              train.max_steps=40 train.epochs=1 train.checkpoint_every_steps=10 train.progress=false
              reader.batch_size=256 "train.model.mlp_layers=[64]")
  setsid "$@" -m recsys_kd.cli "${args[@]}" > "$output.first.log" 2>&1 &
  local job=$! waited=0
  until [ -e "$output/checkpoints/latest" ] || ! kill -0 "$job" 2>/dev/null || [ "$waited" -ge 600 ]; do
    sleep 0.2; waited=$((waited + 1))
  done
  kill -9 -- "-$job" 2>/dev/null
  wait "$job" 2>/dev/null
  [ -e "$output/checkpoints/latest" ] || { echo "no checkpoint before the kill"; return 1; }
  "$@" -m recsys_kd.cli "${args[@]}" > "$output.resume.log" 2>&1 || { tail -5 "$output.resume.log"; return 1; }
  grep -q "resumed from" "$output.resume.log" || { echo "the rerun did not resume"; return 1; }
  "$python" tools/gpu_smoke_checks.py resumed "$output/train.json" 40
}

infer_teacher() {  # SOURCE OUTPUT BACKEND LAUNCHER...: score every split with the trained model as the teacher
  local source=$1 output=$2 backend=$3
  shift 3
  "$@" -m recsys_kd.cli infer -c "$recipe" "prepare.output=$work/data" "infer.teachers=[{name: t, train_output: $source}]" \
      "infer.output=$output" "infer.backend=$backend" infer.progress=false | tail -1
}

compress_both() {  # SOURCE OUTPUT BACKEND LAUNCHER...: AFM and SVD, tables 16 -> 4, each fine-tuned one epoch
  local source=$1 output=$2 backend=$3
  shift 3
  "$@" -m recsys_kd.cli compress -c "$recipe" "prepare.output=$work/data" "compress.source=$source" \
      "compress.output=$output" "compress.backend=$backend" "compress.steps=[{what: embeddings, rank: 4}]" \
      compress.stats_batches=4 compress.finetune.epochs=1 compress.progress=false > "$output.log" 2>&1 \
    || { tail -5 "$output.log"; return 1; }
  "$python" tools/gpu_smoke_checks.py compressed "$output/compress.json"
}

export_artifact() {  # SOURCE ARTIFACT
  cli export -c "$recipe" "export.source=$1" "export.output=$2" "prepare.output=$work/data" > "$2.log" 2>&1 \
    || { tail -3 "$2.log"; return 1; }
  [ -s "$2" ] && echo "artifact $(du -h "$2" | cut -f1), parity checked by export"
}

pipeline_vs_synchronous() {  # LAUNCHER...: the same CUDA run with train.pipeline sparse_dist and none
  local args=(train -c "$recipe" "prepare.output=$work/data" train.backend=nccl train.max_steps=40 train.epochs=1
              train.eval_every_steps=15 train.progress=false reader.batch_size=256 "train.model.mlp_layers=[64]")
  local kind
  for kind in sparse_dist none; do
    "$@" -m recsys_kd.cli "${args[@]}" "train.output=$work/pipeline_$kind" "train.pipeline=$kind" \
        > "$work/pipeline_$kind.log" 2>&1 || { tail -5 "$work/pipeline_$kind.log"; return 1; }
  done
  "$python" tools/gpu_smoke_checks.py pipeline "$work/pipeline_sparse_dist" "$work/pipeline_none" "$work/data"
}

throughput() {  # NGPU: samples/s of a longer CUDA run and the GPU utilisation meanwhile
  local output=$work/train_speed
  "$python" tools/gpu_smoke_checks.py utilisation 60 "$work/utilisation.json" &
  local sampler=$!
  "${launcher[@]}" "$1" -m recsys_kd.cli train -c "$recipe" "prepare.output=$work/data" \
      "train.output=$output" train.backend=nccl train.max_steps=300 train.epochs=5 train.progress=false \
      reader.batch_size=4096 > "$output.log" 2>&1 || { kill "$sampler" 2>/dev/null; tail -5 "$output.log"; return 1; }
  kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
  "$python" tools/gpu_smoke_checks.py speed "$output/train.json" "$work/utilisation.json"
}

cuda=0
if [ "$cpu_only" = 0 ] && "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  cuda=1
  gpus=$("$python" -c 'import torch; print(torch.cuda.device_count())')
fi
echo "gpu_smoke: $(date -u +%FT%TZ) on $(hostname), work dir $work"

check "installed stack + version guard" stack
check "planner topology 2 hosts x 8 GPUs" planner_topology
check "prepare 20k synthetic rows" prepare
check "train, SIGKILL, resume (gloo, CLI)" train_kill_resume "$work/train_gloo" gloo "$python"
check "infer: teacher scores (gloo)" infer_teacher "$work/train_gloo" "$work/soft_gloo" gloo "$python"
check "compress: AFM and SVD (gloo)" compress_both "$work/train_gloo" "$work/compress_gloo" gloo "$python"
check "export from the CPU checkpoint" export_artifact "$work/train_gloo" "$work/gloo.pt"
check "fused TBE kernel (FBGEMM, CPU)" "$python" tools/gpu_smoke_checks.py tbe cpu

cuda_checks=("fused TBE kernel (FBGEMM, CUDA)" "NCCL collectives (all GPUs)" "train, SIGKILL, resume (NCCL, DCP)"
             "train pipeline = synchronous (CUDA)" "infer: teacher scores (NCCL)" "compress: AFM and SVD (NCCL)" "export from the GPU checkpoint"
             "samples/s and GPU utilisation")
launcher=("$python" -m torch.distributed.run --standalone --nproc_per_node)
if [ "$cuda" = 1 ]; then
  check "${cuda_checks[0]}" "$python" tools/gpu_smoke_checks.py tbe cuda
  check "${cuda_checks[1]}" "${launcher[@]}" "$gpus" tools/gpu_smoke_checks.py collectives
  check "${cuda_checks[2]}" train_kill_resume "$work/train_nccl" nccl "${launcher[@]}" "$gpus"
  check "${cuda_checks[3]}" pipeline_vs_synchronous "${launcher[@]}" "$gpus"
  check "${cuda_checks[4]}" infer_teacher "$work/train_nccl" "$work/soft_nccl" nccl "${launcher[@]}" "$gpus"
  check "${cuda_checks[5]}" compress_both "$work/train_nccl" "$work/compress_nccl" nccl "${launcher[@]}" "$gpus"
  check "${cuda_checks[6]}" export_artifact "$work/train_nccl" "$work/nccl.pt"
  check "${cuda_checks[7]}" throughput "$gpus"
else
  for name in "${cuda_checks[@]}"; do skip "$name"; done
fi
[ "$failures" = 0 ] && echo "gpu_smoke: all checks passed" || echo "gpu_smoke: $failures check(s) failed"
exit $((failures > 0))

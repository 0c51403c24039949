#!/usr/bin/env bash
# The one shell entry point of the CALM pipeline.
#
#   bash run.sh setup                       create .venv/ and install the pinned requirements
#   bash run.sh prep [data_prep args]       corpora -> tokenizer + webdataset shards
#   bash run.sh train --stage S --config P [key=value ...]
#   bash run.sh eval [evaluation args]      BrierLM / reconstruction of exported models
#   bash run.sh report [report args]        report.md + plots from several runs
#   bash run.sh generate --model DIR --prompt "..."
#   bash run.sh quickstart                  the whole job on a tiny offline default
#   bash run.sh test [pytest args]          setup, then the test suite
#   bash run.sh gpu-check [--dry-run]       check and measure the CUDA path on one GPU (bench/gpu_check.py)
#   bash run.sh wheels DIR                  wheels for a GPU machine's own Python (bench/wheels.py)
#
# A machine's own Python instead of .venv/ (a GPU machine with torch for its CUDA, no package index):
#   CALM_PYTHON=python3           use this interpreter; nothing is created or installed from an index
#   CALM_WHEELS=DIR               first install the wheels made by `bash run.sh wheels DIR` (no index, no
#                                 dependencies) into .site-packages/ (or CALM_SITE), put first on PYTHONPATH
#
# Launching `train` (and distributed `eval`) is driven by environment variables:
#   NPROC=N                       processes on this node (default 1; GPUs on a GPU node)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node through torchrun (static rendezvous)
#   LAUNCHER=torchrun|deepspeed|slurm|python       (default: python for 1 process, else torchrun)
#   HOSTFILE=path                 with LAUNCHER=deepspeed: a DeepSpeed hostfile
#   Under SLURM (LAUNCHER=slurm, inside sbatch): one torchrun per node via srun, NNODES, NODE_RANK
#   and MASTER_ADDR taken from SLURM_* variables.
#   Every launched process inherits this environment (WANDB_API_KEY, WANDB_MODE, NCCL_*, ...).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
TORCH_VERSION="2.13.0"

log() { printf '[run.sh] %s\n' "$*" >&2; }
die() { printf '[run.sh] error: %s\n' "$*" >&2; exit 1; }

if [[ -n "${CALM_PYTHON:-}" ]]; then
  PY="$(command -v "$CALM_PYTHON")" || die "CALM_PYTHON=$CALM_PYTHON: no such interpreter"
fi

# CALM_PYTHON: the wheels of CALM_WHEELS into .site-packages/ (once per set of wheels), then a check
# that the interpreter imports what training needs.
external_setup() {
  local site="${CALM_SITE:-$ROOT/.site-packages}" want
  if [[ -n "${CALM_WHEELS:-}" ]]; then
    compgen -G "$CALM_WHEELS/*.whl" >/dev/null || die "CALM_WHEELS=$CALM_WHEELS holds no wheels (bash run.sh wheels DIR)"
    want="$(cd "$CALM_WHEELS" && ls -1 ./*.whl | sha256sum | cut -d' ' -f1)"
    if [[ "$(cat "$site/.wheels" 2>/dev/null)" != "$want" ]]; then
      log "installing the wheels of $CALM_WHEELS into $site (no index, no dependencies)"
      rm -rf "$site"
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --target "$site" "$CALM_WHEELS"/*.whl || die "installing $CALM_WHEELS/*.whl with $PY failed"
      echo "$want" >"$site/.wheels"
    fi
  fi
  if [[ -d "$site" ]]; then export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"; fi
  local out
  if ! out="$("$PY" -c 'import torch, transformers, deepspeed' 2>&1)"; then
    printf '%s\n' "$out" | tail -n 5 >&2
    die "$PY cannot import torch, transformers and deepspeed: set CALM_WHEELS=DIR (bash run.sh wheels DIR)"
  fi
}

setup() {
  if [[ -n "${CALM_PYTHON:-}" ]]; then external_setup; return 0; fi
  local stamp="$VENV/.requirements.sha256"
  local want
  want="$(sha256sum requirements.txt | cut -d' ' -f1)"
  if [[ -x "$PY" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    [[ "${1:-}" == verbose ]] && log "environment ready in $VENV (requirements.txt unchanged since it was installed)"
    return 0
  fi
  command -v python3 >/dev/null || die "python3 not found (Python 3.11 is required)"
  if [[ ! -x "$PY" ]]; then
    log "creating $VENV"
    python3 -m venv "$VENV" || die "python3 -m venv failed (on Debian: apt-get install python3-venv)"
  fi
  log "installing torch==$TORCH_VERSION, then requirements.txt with torch pinned"
  "$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$PY" -m pip install -q "torch==$TORCH_VERSION"
  "$PY" -m pip install -q -r requirements.txt -c <(echo "torch==$TORCH_VERSION")
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    # flash-attn only builds against CUDA; without it the models fall back to SDPA.
    log "CUDA present: installing the optional flash-attn extra"
    "$PY" -m pip install -q flash-attn==2.8.3.post2 --no-build-isolation \
      -c <(echo "torch==$TORCH_VERSION") || log "flash-attn failed to install; SDPA will be used"
  fi
  echo "$want" >"$stamp"
  log "environment ready in $VENV"
}

# Sensible CPU threading: one thread per core share per rank unless the user set it.
cpu_threads() {
  local nproc_local="${NPROC:-1}" cores
  cores="$(nproc)"
  echo $(( cores / nproc_local > 0 ? cores / nproc_local : 1 ))
}

export_common_env() {
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(cpu_threads)}"
  export PYTHONUNBUFFERED=1
  export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
  # Keep freed memory in glibc's heap instead of unmapping it: on CPU, tensors allocated afresh every
  # step otherwise cost as much kernel time in page faults as the compute itself (training steps
  # measured 1.5-2.2x faster with these thresholds; jemalloc/tcmalloc via LD_PRELOAD do the same).
  export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-17179869184}"
  export MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-17179869184}"
  # DeepSpeed's CPU accelerator only where torch sees no GPU: nvidia-smi can be missing from a
  # container whose CUDA works, and present where the driver is broken.
  if [[ -z "${DS_ACCELERATOR:-}" ]] && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    export DS_ACCELERATOR=cpu
  fi
}

# The first host of a SLURM hostlist ("gpu-[003-005,010],cpu1" -> gpu-003): the rendezvous node.
# scontrol expands it where SLURM's tools are installed; without them (a container holding only the
# job's environment) the hostlist syntax is read here: name parts and [ranges] up to the first
# top-level comma, taking the first number of each range with its zero padding.
first_slurm_host() {
  local list="$1" rest host="" range
  # (timeout: without a slurm.conf scontrol retries for a minute before it gives up)
  if command -v scontrol >/dev/null 2>&1 \
      && host="$(timeout 10 scontrol show hostnames "$list" 2>/dev/null | head -n 1)" && [[ -n "$host" ]]; then
    echo "$host"
    return
  fi
  host=""  # scontrol missing, or installed without a usable configuration: read the hostlist here
  local re_name='^([^],[]+)(.*)$' re_range='^\[([^]]+)\](.*)$'
  rest="$list"
  while [[ -n "$rest" && "${rest:0:1}" != "," ]]; do
    if [[ "$rest" =~ $re_range ]]; then
      range="${BASH_REMATCH[1]%%,*}"; host+="${range%%-*}"; rest="${BASH_REMATCH[2]}"
    elif [[ "$rest" =~ $re_name ]]; then
      host+="${BASH_REMATCH[1]}"; rest="${BASH_REMATCH[2]}"
    else
      die "cannot read the first host of SLURM_JOB_NODELIST='$list' (and scontrol could not expand it)"
    fi
  done
  [[ -n "$host" ]] || die "SLURM_JOB_NODELIST is empty; run inside an allocation (sbatch/salloc)"
  echo "$host"
}

# Launch `python -m MODULE ARGS...` under the launcher chosen by the environment.
launch() {
  local module="$1"; shift
  local nproc="${NPROC:-1}" nnodes="${NNODES:-1}" node_rank="${NODE_RANK:-0}"
  local addr="${MASTER_ADDR:-127.0.0.1}" port="${MASTER_PORT:-29500}"
  local launcher="${LAUNCHER:-}"
  if [[ -z "$launcher" ]]; then
    if [[ "$nproc" == 1 && "$nnodes" == 1 ]]; then launcher=python; else launcher=torchrun; fi
  fi
  export_common_env
  case "$launcher" in
    python)
      exec "$PY" -m "$module" "$@" ;;
    torchrun)
      exec "$PY" -m torch.distributed.run --nnodes "$nnodes" --node_rank "$node_rank" --nproc_per_node "$nproc" \
        --master_addr "$addr" --master_port "$port" -m "$module" "$@" ;;
    deepspeed)
      local args=(--master_addr "$addr" --master_port "$port")
      if [[ -n "${HOSTFILE:-}" ]]; then
        args+=(--hostfile "$HOSTFILE" --num_nodes "$nnodes" --node_rank "$node_rank" --no_ssh)
      fi
      exec "$PY" -m deepspeed.launcher.runner --num_gpus "$nproc" "${args[@]}" --module "$module" "$@" ;;
    slurm)
      [[ -n "${SLURM_JOB_ID:-}" ]] || die "LAUNCHER=slurm must run inside a SLURM allocation (sbatch/salloc)"
      local head nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-}}"
      [[ -n "$nodes" ]] || die "neither SLURM_JOB_NUM_NODES nor SLURM_NNODES is set in this allocation"
      head="$(first_slurm_host "${SLURM_JOB_NODELIST:-}")"
      export MASTER_ADDR="$head" MASTER_PORT="$port"
      log "SLURM job $SLURM_JOB_ID: $nodes node(s) x $nproc process(es), rendezvous at $head:$port"
      command -v srun >/dev/null 2>&1 || die "LAUNCHER=slurm needs srun on PATH"
      # srun starts one torchrun per node; each reads its node rank from SLURM_NODEID.
      exec srun --nodes "$nodes" --ntasks-per-node 1 --export=ALL bash -c \
        "exec '$PY' -m torch.distributed.run --nnodes '$nodes' --node_rank \"\$SLURM_NODEID\" \
         --nproc_per_node '$nproc' --master_addr '$head' --master_port '$port' -m '$module' $(printf '%q ' "$@")" ;;
    *)
      die "unknown LAUNCHER=$launcher (torchrun, deepspeed, slurm or python)" ;;
  esac
}

cmd="${1:-help}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
  setup)
    setup verbose ;;
  prep)
    setup; export_common_env; exec "$PY" -m data_prep "$@" ;;
  train)
    setup; launch pretrain "$@" ;;
  eval)
    setup; launch evaluation "$@" ;;
  report)
    setup; export_common_env; exec "$PY" -m evaluation.report "$@" ;;
  generate)
    setup; export_common_env; exec "$PY" -m evaluation.generate "$@" ;;
  quickstart)
    setup; export_common_env; exec "$PY" -m quickstart "$@" ;;
  test)
    setup; export_common_env; export OMP_NUM_THREADS=1
    exec "$PY" -m pytest "$@" ;;
  gpu-check)
    setup; export_common_env; exec "$PY" -m bench.gpu_check "$@" ;;
  wheels)
    setup; exec "$PY" -m bench.wheels "$@" ;;
  help|-h|--help)
    sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//' ;;
  *)
    die "unknown command '$cmd' (try: bash run.sh help)" ;;
esac

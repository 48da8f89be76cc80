#!/bin/bash
# Shared SLURM launcher of launch/slurm/train_dpo.sbatch and train_rm.sbatch (see docs/cluster.md).
#
#   launch.sh TASK [--dry-run] [--config FILE] [a.b=c ...]      batch mode (inside the sbatch job)
#   launch.sh --node TASK [--config FILE] [a.b=c ...]           node mode (one per node, run by srun)
#
# Batch mode: one `srun --ntasks-per-node=1` step runs this script in node mode on every node; node mode
# runs one torchrun (c10d rendezvous on the first host of SLURM_JOB_NODELIST, --nnodes from SLURM,
# --nproc-per-node from NPROC_PER_NODE / SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE / nvidia-smi) whose
# workers are launch/slurm/worker.py TASK. --dry-run prints the srun step and every node's torchrun
# command, then exits 0 without launching anything.
#
# Preemption: SIGUSR1 (sbatch --signal=B:USR1@300) or SIGTERM reaching the batch shell is forwarded as USR1
# to the srun step, which delivers it to every process of the step: the workers (a node script also
# relays it to its torchrun's workers) and torchrun's agent, which runs with USR1 ignored (it has no
# handler and would die; on TERM it kills its workers 30 s later, so long saves need the USR1 path).
# The training loop saves, the workers exit 75 leaving marker files, and the batch shell runs
# `scontrol requeue` once the step has ended.
#
# Exit codes of this script (batch mode):
#   0   training finished (or --dry-run)
#   64  usage error (unknown task, no --config, no SLURM job environment) before anything ran
#   75  preempted: the run saved its state and the job was requeued (or REQUEUE=0: not requeued)
#   *   otherwise the srun step's exit code (torchrun exits 1 when any worker failed)
#
# Environment (all optional): NPROC_PER_NODE, MASTER_PORT (rendezvous port; default 20000 + job id mod
# 20000), RDZV_HOST (default: the first node of the job, or its NodeAddr when the name does not resolve), LOG_DIR (default $ROOT/logs/slurm), TORCHRUN
# (default torchrun), REQUEUE (default 1), CONTAINER_IMAGE / CONTAINER_MOUNTS / CONTAINER_ROOT (pyxis),
# MEGATRON_PREFIX_ROOT (the checkout; default: this script's repository, else $SLURM_SUBMIT_DIR),
# EXTRA_SRUN_ARGS, EXTRA_TORCHRUN_ARGS. NCCL_* and the rest of the environment pass through to the workers.

set -uo pipefail

EXIT_USAGE=64
EXIT_PREEMPTED=75  # megatron_prefix/training/exit_codes.py: EXIT_PREEMPTED

usage() {
    echo "usage: launch.sh {dpo|rm} [--dry-run] [--config FILE] [a.b=c ...]" >&2
    echo "       launch.sh --node {dpo|rm} [--config FILE] [a.b=c ...]" >&2
    exit "$EXIT_USAGE"
}

die_usage() {
    echo "launch.sh: error: $*" >&2
    exit "$EXIT_USAGE"
}

# ---------------------------------------------------------------------------------------- node list

# expand_nodelist "gpu[01-03,7],cpu5" -> one host per line (fallback when scontrol is absent)
expand_nodelist() {
    local list=$1 token="" depth=0 ch i
    local -a tokens=()
    for ((i = 0; i < ${#list}; i++)); do
        ch=${list:i:1}
        case $ch in
            "[") depth=$((depth + 1)); token+=$ch ;;
            "]") depth=$((depth - 1)); token+=$ch ;;
            ",") if ((depth == 0)); then tokens+=("$token"); token=""; else token+=$ch; fi ;;
            *) token+=$ch ;;
        esac
    done
    [[ -n $token ]] && tokens+=("$token")
    local t prefix ranges suffix part lo hi width n
    for t in "${tokens[@]}"; do
        if [[ $t =~ ^([^[]*)\[([^]]*)\](.*)$ ]]; then
            prefix=${BASH_REMATCH[1]} ranges=${BASH_REMATCH[2]} suffix=${BASH_REMATCH[3]}
            IFS=, read -ra parts <<< "$ranges"
            for part in "${parts[@]}"; do
                if [[ $part == *-* ]]; then
                    lo=${part%-*} hi=${part#*-} width=${#lo}
                    for ((n = 10#$lo; n <= 10#$hi; n++)); do
                        expand_nodelist "$(printf "%s%0*d%s" "$prefix" "$width" "$n" "$suffix")"
                    done
                else
                    expand_nodelist "$prefix$part$suffix"
                fi
            done
        else
            echo "$t"
        fi
    done
}

# the job's hosts, one per line: `scontrol show hostnames`, else the fallback parser
job_hosts() {
    local list=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}
    [[ -n $list ]] || return 1
    if command -v scontrol > /dev/null 2>&1 && [[ -z ${LAUNCH_NO_SCONTROL:-} ]]; then
        scontrol show hostnames "$list" 2> /dev/null && return 0
    fi
    expand_nodelist "$list"
}

# a host name other nodes can reach: the node name if it resolves, else its NodeAddr from scontrol
node_addr() {
    local addr
    if command -v getent > /dev/null 2>&1 && getent hosts "$1" > /dev/null 2>&1; then
        echo "$1"
        return
    fi
    if command -v scontrol > /dev/null 2>&1 && [[ -z ${LAUNCH_NO_SCONTROL:-} ]]; then
        addr=$(scontrol show node "$1" 2> /dev/null | grep -o 'NodeAddr=[^ ]*' | head -1)
        addr=${addr#NodeAddr=}
        [[ -n $addr ]] && { echo "$addr"; return; }
    fi
    echo "$1"
}

# processes per node: NPROC_PER_NODE, SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE ("8" or "h100:8"), nvidia-smi, 1
procs_per_node() {
    local n=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
    if [[ -z $n && -n ${SLURM_GPUS_PER_NODE:-} ]]; then
        n=${SLURM_GPUS_PER_NODE##*:}
        n=${n%%(*}
    fi
    if [[ -z $n ]] && command -v nvidia-smi > /dev/null 2>&1; then
        n=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU')
    fi
    [[ $n =~ ^[1-9][0-9]*$ ]] || n=1
    echo "$n"
}

# ---------------------------------------------------------------------------------------- commands

# sets the globals the commands are built from (same values in batch and node mode)
resolve_layout() {
    mapfile -t HOSTS < <(job_hosts)
    ((${#HOSTS[@]} > 0)) || die_usage "SLURM_JOB_NODELIST is not set: run inside an sbatch/salloc job (or fake it for --dry-run)"
    NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-${#HOSTS[@]}}}
    NPROC=$(procs_per_node)
    JOB_ID=${SLURM_JOB_ID:-0}
    RESTART=${SLURM_RESTART_COUNT:-0}
    RDZV_HOST=${RDZV_HOST:-$(node_addr "${HOSTS[0]}")}
    MASTER_PORT=${MASTER_PORT:-$((20000 + JOB_ID % 20000))}
    RUN_LOG_DIR=${LOG_DIR:-$ROOT/logs/slurm}/${SLURM_JOB_NAME:-job}-$JOB_ID/attempt-$RESTART
    if [[ -n ${CONTAINER_IMAGE:-} ]]; then
        NODE_ROOT=${CONTAINER_ROOT:-/opt/megatron_prefix}
    else
        NODE_ROOT=$ROOT
    fi
}

# TORCHRUN_CMD: the torchrun command every node runs
build_torchrun_cmd() {
    local -a launcher extra=()
    read -ra launcher <<< "${TORCHRUN:-torchrun}"
    [[ -n ${EXTRA_TORCHRUN_ARGS:-} ]] && read -ra extra <<< "$EXTRA_TORCHRUN_ARGS"
    TORCHRUN_CMD=(
        "${launcher[@]}"
        --nnodes="$NNODES"
        --nproc-per-node="$NPROC"
        --rdzv-backend=c10d
        --rdzv-endpoint="$RDZV_HOST:$MASTER_PORT"
        --rdzv-id="$JOB_ID-$RESTART"
        --max-restarts=0
        --log-dir="$RUN_LOG_DIR/ranks" --redirects=3 --tee=3
        "${extra[@]}"
        "$NODE_ROOT/launch/slurm/worker.py" "$TASK" "${TRAIN_ARGS[@]}"
    )
}

# SRUN_CMD: the one srun step of the batch shell (this script in node mode on every node)
build_srun_cmd() {
    local -a container=() extra=()
    if [[ -n ${CONTAINER_IMAGE:-} ]]; then
        container=(--container-image="$CONTAINER_IMAGE" --container-workdir="$NODE_ROOT")
        [[ -n ${CONTAINER_MOUNTS:-} ]] && container+=(--container-mounts="$CONTAINER_MOUNTS")
    fi
    [[ -n ${EXTRA_SRUN_ARGS:-} ]] && read -ra extra <<< "$EXTRA_SRUN_ARGS"
    SRUN_CMD=(
        srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=0
        --output="$RUN_LOG_DIR/node-%n.log"
        "${container[@]}" "${extra[@]}"
        bash "$NODE_ROOT/launch/slurm/launch.sh" --node "$TASK" "${TRAIN_ARGS[@]}"
    )
}

print_cmd() {
    printf '%q ' "$@" | sed 's/ $//'
    echo
}

# ---------------------------------------------------------------------------------------- node mode

# direct children of a pid (torchrun's workers): ps, else /proc
children_of() {
    if command -v ps > /dev/null 2>&1; then
        ps -o pid= --ppid "$1" 2> /dev/null | tr -d ' '
        return
    fi
    local stat rest p
    for p in /proc/[0-9]*; do
        stat=$(< "$p/stat") 2> /dev/null || continue
        rest=${stat##*) }
        read -r _ ppid _ <<< "$rest"
        [[ $ppid == "$1" ]] && echo "${p#/proc/}"
    done
}

relay_to_workers() {
    local sig=$1 pid
    echo "launch.sh[node $(hostname)]: SIG$sig: relaying to the workers of torchrun $TORCHRUN_PID" >&2
    [[ -n $TORCHRUN_PID ]] || return 0  # not started yet: the workers will see SLURM's own delivery
    for pid in $(children_of "$TORCHRUN_PID"); do
        kill -s "$sig" "$pid" 2> /dev/null
    done
}

# wait for a background pid across trapped signals; returns its exit status
wait_for() {
    local rc
    while :; do
        wait "$1"
        rc=$?
        kill -0 "$1" 2> /dev/null || return "$rc"
    done
}

node_main() {
    resolve_layout
    build_torchrun_cmd
    export MP_PREEMPT_DIR=$RUN_LOG_DIR/preempted
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # megatron TP/SP comm overlap
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    mkdir -p "$RUN_LOG_DIR/ranks"
    echo "launch.sh[node $(hostname)]: $(print_cmd "${TORCHRUN_CMD[@]}")" >&2
    # SLURM delivers a step's signals to every process of the step, torchrun's agent included, and the
    # agent has no USR1 handler (it would die and orphan its workers): it runs with USR1 ignored (the
    # workers install their own handler first thing, launch/slurm/worker.py)
    TORCHRUN_PID=""
    trap 'relay_to_workers USR1' USR1
    trap 'relay_to_workers TERM' TERM
    (trap '' USR1; exec "${TORCHRUN_CMD[@]}") &
    TORCHRUN_PID=$!
    wait_for "$TORCHRUN_PID"
}

# ---------------------------------------------------------------------------------------- batch mode

# USR1 whatever arrived: srun forwards it to the node scripts (a TERM could end the step instead)
forward_to_step() {
    echo "launch.sh: SIG$1 at $(date -u +%FT%TZ): asking the training step to save and exit (USR1)" >&2
    if [[ -z ${SRUN_PID:-} ]]; then
        PENDING_SIGNAL=$1
        return
    fi
    kill -s USR1 "$SRUN_PID" 2> /dev/null
}

batch_main() {
    resolve_layout
    build_torchrun_cmd
    build_srun_cmd
    if ((DRY_RUN)); then
        echo "# job ${JOB_ID} (restart $RESTART): $NNODES nodes x $NPROC processes, task $TASK," \
             "rendezvous $RDZV_HOST:$MASTER_PORT, logs $RUN_LOG_DIR"
        echo "# batch step:"
        print_cmd "${SRUN_CMD[@]}"
        local host
        for host in "${HOSTS[@]}"; do
            echo "# on $host:"
            print_cmd "${TORCHRUN_CMD[@]}"
        done
        exit 0
    fi
    mkdir -p "$RUN_LOG_DIR/preempted" || exit 1
    rm -f "$RUN_LOG_DIR"/preempted/*
    echo "launch.sh: job $JOB_ID restart $RESTART: $NNODES nodes x $NPROC, rendezvous $RDZV_HOST:$MASTER_PORT," \
         "logs $RUN_LOG_DIR" >&2
    echo "launch.sh: $(print_cmd "${SRUN_CMD[@]}")" >&2
    SRUN_PID=""
    PENDING_SIGNAL=""
    trap 'forward_to_step USR1' USR1
    trap 'forward_to_step TERM' TERM
    "${SRUN_CMD[@]}" &
    SRUN_PID=$!
    if [[ -n $PENDING_SIGNAL ]]; then  # arrived before the step existed
        sleep 5
        forward_to_step "$PENDING_SIGNAL"
    fi
    wait_for "$SRUN_PID"
    local rc=$?
    trap - USR1 TERM
    if compgen -G "$RUN_LOG_DIR/preempted/*" > /dev/null; then
        echo "launch.sh: preempted: the training saved its state (step exit $rc)" >&2
        if [[ ${REQUEUE:-1} != 0 && -n ${SLURM_JOB_ID:-} ]]; then
            echo "launch.sh: scontrol requeue $SLURM_JOB_ID" >&2
            scontrol requeue "$SLURM_JOB_ID" || echo "launch.sh: requeue failed; resubmit to resume" >&2
        fi
        exit "$EXIT_PREEMPTED"
    fi
    echo "launch.sh: step finished with exit code $rc" >&2
    exit "$rc"
}

# ---------------------------------------------------------------------------------------- main

if [[ -n ${MEGATRON_PREFIX_ROOT:-} ]]; then
    ROOT=$MEGATRON_PREFIX_ROOT
elif [[ -f $(dirname "${BASH_SOURCE[0]}")/worker.py ]]; then
    ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
else
    ROOT=${SLURM_SUBMIT_DIR:-$PWD}
fi

NODE_MODE=0
DRY_RUN=0
if [[ ${1:-} == --node ]]; then
    NODE_MODE=1
    shift
fi
TASK=${1:-}
[[ $TASK == dpo || $TASK == rm ]] || usage
shift
TRAIN_ARGS=()
HAVE_CONFIG=0
for arg in "$@"; do
    case $arg in
        --dry-run) DRY_RUN=1 ;;
        --config | --config=*) HAVE_CONFIG=1; TRAIN_ARGS+=("$arg") ;;
        *) TRAIN_ARGS+=("$arg") ;;
    esac
done
if ((!HAVE_CONFIG)); then
    [[ -n ${CONFIG:-} ]] || die_usage "no --config FILE (or CONFIG=FILE) given"
    TRAIN_ARGS=(--config "$CONFIG" "${TRAIN_ARGS[@]}")
fi

if ((NODE_MODE)); then
    node_main
else
    batch_main
fi

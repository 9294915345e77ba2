#!/usr/bin/env bash
# Train one Imagen stage on every worker (host) of a Cloud TPU VM slice at once.
#
#   TPU_NAME=my-v4-64 ZONE=us-central2-b WORKDIR=gs://my-bucket/base64 \
#   CONFIG=configs/imagen_base64.py launch/tpu_pod.sh --dry-run all -- --config.data.folder=/data/laion
#
# Usage: launch/tpu_pod.sh [--dry-run] [ACTION] [-- EXTRA TRAIN.PY FLAGS...]
#   install  copy this checkout (tracked + untracked, not git-ignored files) to every worker and
#            pip-install it with jax[tpu] into a virtualenv there
#   train    start `python train.py --config $CONFIG --workdir $WORKDIR --distributed [extra flags]`
#            on every worker at once, detached (log: ~/imagen_jax_train.log on each worker)
#   all      install, then train (the default)
#   stop     send SIGTERM to train.py on every worker: all processes stop at the same step, write a
#            checkpoint and exit 0; `train` (or `all`) again resumes from it
#   logs     follow worker 0's log (process 0 writes TensorBoard and sample grids to $WORKDIR)
#   --dry-run  print every command instead of running it
#
# Environment:
#   TPU_NAME  (required) the TPU VM node; for multi-slice, several nodes separated by spaces
#   ZONE      (required) its zone
#   PROJECT   Google Cloud project (default: gcloud's configured project)
#   WORKDIR   (required) gs://bucket/path: every worker reads and writes the same checkpoints there.
#             The TPU VMs' service account needs read/write access to the bucket.
#   CONFIG    config file[:variant] relative to the repository (default configs/imagen_base64.py)
#   TRAIN_ARGS  extra train.py flags as one shell-quoted string (added before those after `--`)
#   REMOTE_DIR  where the code goes on each worker (default $HOME/imagen_jax there; files are copied
#               over it, nothing there is deleted)
#   VENV        virtualenv on each worker (default $HOME/imagen_jax_venv there)
#   EXTRA_PIP   more pip requirements to install on each worker (space-separated)
#
# What it does NOT do: create, stop or delete TPUs, or delete anything. Create the slice first, e.g.
#   gcloud compute tpus tpu-vm create my-v4-64 --zone=us-central2-b --accelerator-type=v4-64 \
#       --version=tpu-ubuntu2204-base          # add --spot (or --preemptible) for spot capacity
# The runtime version (--version) must match the TPU generation; see the Cloud TPU docs.
#
# Spot / preemptible TPUs: before a preemption or maintenance event the workers get SIGTERM; the
# processes agree on a step, save it to $WORKDIR and exit 0. A preempted TPU VM does not come back by
# itself: create it again (same name is fine), then run this script with `all` and the same WORKDIR,
# CONFIG and flags. Training resumes from the newest verified checkpoint, the input stream included.
# The checkpoint also restores onto a slice of another size or another mesh/preset (resharding on load).
#
# Multi-slice (several slices over the data-centre network, DCN): create the slices together as one
# queued resource, e.g.
#   gcloud compute tpus queued-resources create my-qr --zone=... --accelerator-type=v5litepod-256 \
#       --runtime-version=... --node-count=2 --node-prefix=my-slice [--spot]
# then pass every node: TPU_NAME="my-slice-0 my-slice-1" (names: `gcloud compute tpus tpu-vm list`).
# Tell the mesh how many slices each axis spans; config.mesh then sizes ONE slice:
#   -- --config.mesh_dcn="(('data', 2),)" --config.mesh="(('data', 1), ('fsdp', -1), ('tensor', 1))"
# (data parallel across slices, FSDP inside each slice: only gradients cross the slower DCN links).
# See docs/scale_out.md.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

DRY_RUN=0
ACTION=all
EXTRA=()
while (($#)); do
  case "$1" in
    --dry-run | -n) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    install | train | all | stop | logs) ACTION="$1" ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "error: unknown argument '$1' (actions: install train all stop logs; train.py flags go after --)" >&2; exit 2 ;;
  esac
  shift
done

: "${TPU_NAME:?set TPU_NAME (the TPU VM node; several names separated by spaces for multi-slice)}"
: "${ZONE:?set ZONE (the TPU zone, e.g. us-central2-b)}"
CONFIG="${CONFIG:-configs/imagen_base64.py}"
# $HOME stays literal here: the worker's shell expands it.
REMOTE_DIR="${REMOTE_DIR:-\$HOME/imagen_jax}"
VENV="${VENV:-\$HOME/imagen_jax_venv}"
EXTRA_PIP="${EXTRA_PIP:-}"
# shellcheck disable=SC2016  # expanded on the worker
LOG='$HOME/imagen_jax_train.log'
# shellcheck disable=SC2016
PIDFILE='$HOME/imagen_jax_train.pid'
read -r -a NODES <<<"$TPU_NAME"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

GCLOUD_FLAGS=(--zone="$ZONE")
if [[ -n "${PROJECT:-}" ]]; then GCLOUD_FLAGS+=(--project="$PROJECT"); fi

need_workdir() {
  : "${WORKDIR:?set WORKDIR=gs://bucket/path (shared by every worker)}"
  if [[ "$WORKDIR" != gs://* ]]; then
    echo "error: WORKDIR=$WORKDIR: every worker must see the same checkpoints; use gs://bucket/path" >&2
    exit 2
  fi
}

# One word for a shell command line: bare when safe, else in single quotes (readable, pasteable).
quote_sq() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    local sq="'\\''"
    printf "'%s'" "${1//\'/$sq}"
  fi
}

# One word for the worker's shell: bare, in double quotes when nothing in it expands there, else %q.
quote_dq() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  elif [[ "$1" != *[\"\$\`\\!]* ]]; then
    printf '"%s"' "$1"
  else
    printf '%q' "$1"
  fi
}

# Print a command (quoted so it can be pasted) and run it unless --dry-run.
run() {
  if ((DRY_RUN)); then
    local word line=""
    for word in "$@"; do line+="$(quote_sq "$word") "; done
    printf '%s\n' "${line% }"
  else
    "$@"
  fi
}

# Run a shell command on every worker of every node, all nodes at once (gcloud runs the workers of
# one node in parallel; the nodes of a multi-slice job are started in parallel here).
on_all_workers() {
  local cmd="$1" node pids=() rc=0
  for node in "${NODES[@]}"; do
    if ((DRY_RUN)) || ((${#NODES[@]} == 1)); then
      run gcloud compute tpus tpu-vm ssh "$node" "${GCLOUD_FLAGS[@]}" --worker=all --command="$cmd"
    else
      run gcloud compute tpus tpu-vm ssh "$node" "${GCLOUD_FLAGS[@]}" --worker=all --command="$cmd" &
      pids+=($!)
    fi
  done
  for pid in ${pids[@]+"${pids[@]}"}; do wait "$pid" || rc=$?; done
  return "$rc"
}

install() {
  local tmp tarball
  # The working tree as git sees it (tracked and untracked files, minus .gitignore'd ones such as runs/).
  if ((DRY_RUN)); then
    tmp="${TMPDIR:-/tmp}/imagen_jax.XXXXXX"
    tarball="$tmp/imagen_jax.tgz"
    echo "# pack $REPO_ROOT (git ls-files --cached --others --exclude-standard) into $tarball"
  else
    tmp="$(mktemp -d "${TMPDIR:-/tmp}/imagen_jax.XXXXXX")"
    tarball="$tmp/imagen_jax.tgz"
    (cd "$REPO_ROOT" && git ls-files -z --cached --others --exclude-standard |
      COPYFILE_DISABLE=1 tar --null -T - -czf "$tarball")
  fi
  local node
  for node in "${NODES[@]}"; do
    run gcloud compute tpus tpu-vm scp "$tarball" "$node:~/imagen_jax.tgz" "${GCLOUD_FLAGS[@]}" --worker=all
  done
  ((DRY_RUN)) || rm -rf "$tmp"
  # python3 -m venv needs the python3-venv package on Ubuntu images; install it if it is missing.
  local remote
  remote="set -e
mkdir -p $REMOTE_DIR && tar -xzf ~/imagen_jax.tgz -C $REMOTE_DIR
if [ ! -x $VENV/bin/python ]; then
  python3 -m venv $VENV || { sudo apt-get update -q && sudo apt-get install -y -q python3-venv && python3 -m venv $VENV; }
fi
$VENV/bin/pip install -q -U pip
$VENV/bin/pip install -q 'jax[tpu]' -r $REMOTE_DIR/requirements.txt $EXTRA_PIP
echo \"\$(hostname): \$($VENV/bin/python -c 'import jax; print(\"jax\", jax.__version__)') installed in $VENV\""
  on_all_workers "$remote"
}

train() {
  need_workdir
  local args=(--config "$CONFIG" --workdir "$WORKDIR" --distributed)
  if [[ -n "${TRAIN_ARGS:-}" ]]; then
    local more=()
    eval "more=($TRAIN_ARGS)" # shell-parsed, so quoted values such as --config.mesh="(...)" survive
    args+=(${more[@]+"${more[@]}"})
  fi
  args+=(${EXTRA[@]+"${EXTRA[@]}"})
  local quoted="" word
  for word in "${args[@]}"; do quoted+="$(quote_dq "$word") "; done
  # Detached (nohup, stdin/stdout/stderr redirected) so a dropped ssh connection does not kill training.
  # Refuses to start a second run next to a live one.
  local remote
  remote="cd $REMOTE_DIR
if [ -f $PIDFILE ] && kill -0 \$(cat $PIDFILE) 2>/dev/null; then
  echo \"\$(hostname): train.py already running (pid \$(cat $PIDFILE)); use: launch/tpu_pod.sh stop\" >&2; exit 1
fi
nohup $VENV/bin/python train.py ${quoted% } </dev/null >>$LOG 2>&1 &
echo \$! >$PIDFILE
echo \"\$(hostname): started train.py (pid \$!), log $LOG\""
  on_all_workers "$remote"
  echo "Follow it with: TPU_NAME='${NODES[0]}' ZONE=$ZONE launch/tpu_pod.sh logs"
  echo "TensorBoard:    tensorboard --logdir $WORKDIR/tensorboard"
}

stop() {
  local remote
  remote="if [ -f $PIDFILE ] && kill -0 \$(cat $PIDFILE) 2>/dev/null; then
  kill -TERM \$(cat $PIDFILE) && echo \"\$(hostname): SIGTERM sent; train.py saves and exits\"
else
  echo \"\$(hostname): no train.py running\"
fi"
  on_all_workers "$remote"
}

logs() {
  run gcloud compute tpus tpu-vm ssh "${NODES[0]}" "${GCLOUD_FLAGS[@]}" --worker=0 --command="tail -n 200 -F $LOG"
}

case "$ACTION" in
  install) install ;;
  train) train ;;
  all) need_workdir; install; train ;;
  stop) stop ;;
  logs) logs ;;
esac

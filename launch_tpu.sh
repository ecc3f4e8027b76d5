#!/usr/bin/env bash
# Runs one mm_jax command on every worker of a TPU VM slice, creating the slice if it does not exist.
#
#   ./launch_tpu.sh --name=NAME --zone=ZONE [--accelerator=v5litepod-16] [--version=IMAGE] \
#       [--project=PROJECT] [--spot] [--dry-run] -- python -m mm_jax.train --config=... --workdir=gs://...
#
# 1. The slice: reused if `gcloud compute tpus tpu-vm describe NAME` finds it, else created with
#    --accelerator (required then) and --version (default tpu-ubuntu2204-base); --spot asks for a
#    preemptible one.
# 2. This checkout (git archive HEAD: committed files only) is copied to every worker and installed in a
#    venv with the tpu extra (libtpu).
# 3. The command runs on all workers at once (--worker=all) with MM_JAX_DISTRIBUTED=1, so each process
#    calls jax.distributed.initialize() (TPU workers find their peers from the metadata server) and reads
#    its own shard of the data. Checkpoints and workdirs must be on storage every worker sees (gs://).
# --dry-run prints every gcloud/git command instead of running it (nothing is created or copied).
set -euo pipefail

usage="usage: launch_tpu.sh --name=NAME --zone=ZONE [--accelerator=TYPE] [--version=IMAGE] [--project=P] [--spot] [--dry-run] -- COMMAND"
name="" zone="" accelerator="" version="tpu-ubuntu2204-base" project="" spot=0 dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --accelerator=*) accelerator="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --spot) spot=1 ;;
    --dry-run) dry_run=1 ;;
    --) shift; break ;;
    *) echo "launch_tpu.sh: unknown argument $1 ($usage)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -z "$name" || -z "$zone" || $# -eq 0 ]]; then
  echo "launch_tpu.sh: --name, --zone and a command after -- are required ($usage)" >&2
  exit 2
fi

run() { if [[ $dry_run -eq 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }
tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone")
[[ -n "$project" ]] && where+=(--project="$project")

# 1. Reuse or create the slice.
if [[ $dry_run -eq 1 ]]; then
  echo "# if this fails (no slice named $name), the create below runs"
  run "${tpu[@]}" describe "$name" "${where[@]}"
  exists=0
elif "${tpu[@]}" describe "$name" "${where[@]}" >/dev/null 2>&1; then
  exists=1
  echo "launch_tpu.sh: reusing the TPU slice $name in $zone" >&2
else
  exists=0
fi
if [[ $exists -eq 0 ]]; then
  if [[ -z "$accelerator" ]]; then
    echo "launch_tpu.sh: no slice named $name in $zone; give --accelerator=TYPE (e.g. v5litepod-16) to create it" >&2
    exit 2
  fi
  create=("${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator" --version="$version")
  [[ $spot -eq 1 ]] && create+=(--spot)
  run "${create[@]}"
fi

# 2. Copy this checkout and install it on every worker.
archive="${TMPDIR:-/tmp}/mm_jax-$name.tar.gz"
run git archive --format=tar.gz -o "$archive" HEAD
run "${tpu[@]}" scp "$archive" "$name:~/mm_jax.tar.gz" "${where[@]}" --worker=all
install="mkdir -p ~/mm_jax && tar xzf ~/mm_jax.tar.gz -C ~/mm_jax && cd ~/mm_jax"
install+=" && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$install"

# 3. The same command on every worker, with what multi-host needs.
command="cd ~/mm_jax && MM_JAX_DISTRIBUTED=1 .venv/bin/$(printf '%q ' "$@")"
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$command"

#!/usr/bin/env bash
# Runs one mm_jax command on every worker of a TPU VM slice.
#
#   ./launch_tpu.sh --name=NAME --zone=ZONE [--dry-run] -- python -m mm_jax.train --config=... --workdir=gs://...
#
# Skeleton until the pod-scale issue: it copies this checkout to every worker, installs it with the
# tpu extra, and runs the command with MM_JAX_DISTRIBUTED=1 (so each process calls
# jax.distributed.initialize() and reads its own shard of the data). Creating the slice is up to you:
#   gcloud compute tpus tpu-vm create NAME --zone=ZONE --accelerator-type=v5litepod-16 --version=tpu-ubuntu2204-base
# With --dry-run it prints the gcloud commands instead of running them.
set -euo pipefail

name="" zone="" dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --dry-run) dry_run=1 ;;
    --) shift; break ;;
    *) echo "launch_tpu.sh: unknown argument $1 (usage: --name=NAME --zone=ZONE [--dry-run] -- COMMAND)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -z "$name" || -z "$zone" || $# -eq 0 ]]; then
  echo "launch_tpu.sh: usage: --name=NAME --zone=ZONE [--dry-run] -- COMMAND" >&2
  exit 2
fi

run() { if [[ $dry_run -eq 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }

ssh_all() { run gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$1"; }

archive=$(mktemp -d)/mm_jax.tar.gz
run git archive --format=tar.gz -o "$archive" HEAD
run gcloud compute tpus tpu-vm scp "$archive" "$name:~/mm_jax.tar.gz" --zone="$zone" --worker=all
ssh_all "mkdir -p ~/mm_jax && tar xzf ~/mm_jax.tar.gz -C ~/mm_jax && cd ~/mm_jax && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
ssh_all "cd ~/mm_jax && MM_JAX_DISTRIBUTED=1 .venv/bin/$(printf '%q ' "$@")"

#!/usr/bin/env bash
# Pretrain on a Cloud TPU VM slice: create it (optional), copy this checkout to every
# worker, install, and run `morpheus pretrain` on all workers at once (gcloud
# --worker=all). Every worker runs one JAX process; jax.distributed finds the others by
# itself on TPU VMs, so no coordinator flags are needed.
set -euo pipefail

usage() {
  cat <<'TXT'
usage: launch/tpu_vm.sh --name NAME --zone ZONE [options] [--] [pretrain args…]

  --name NAME           TPU VM name
  --zone ZONE           e.g. us-west4-a
  --accelerator TYPE    accelerator type (default v5litepod-32: 8 hosts x 4 chips)
  --version VERSION     TPU software version (default v2-alpha-tpuv5-lite)
  --project PROJECT     GCP project (default: gcloud's)
  --spot                create a Spot VM (preemptible: runs resume from their checkpoints)
  --no-create           the VM exists already; skip creation
  --workdir DIR         folder on the workers (default morpheus-jax)
  --dry-run             print the gcloud commands instead of running them
  pretrain args         passed to `morpheus pretrain`: --config FILE and key=value overrides
                        (put data.dir and run_dir on storage every worker sees, e.g. a
                        gcsfuse mount or a Filestore/NFS share)

Multislice: create the slices with queued resources (`gcloud compute tpus
queued-resources create … --node-count K`) or with XPK (`xpk workload create --tpu-type
v5litepod-256 --num-slices K --command "morpheus pretrain …"`); set mesh.data to span the
slices (the data axis is the one that crosses the slower data-centre network) and keep
fsdp/tensor inside a slice. JAX reads MEGASCALE_* variables set by either tool.
TXT
}

name="" zone="" accel="v5litepod-32" version="v2-alpha-tpuv5-lite" project="" spot=0 create=1
workdir="morpheus-jax" dry=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --accelerator) accel="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --no-create) create=0; shift ;;
    --workdir) workdir="$2"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
if [[ -z "$name" || -z "$zone" ]]; then
  echo "launch/tpu_vm.sh: error: --name and --zone are required (see --help)" >&2
  exit 2
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
proj=()
[[ -n "$project" ]] && proj=(--project "$project")
args=$(printf ' %q' "$@")

run() {
  if [[ $dry -eq 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

if [[ $create -eq 1 ]]; then
  extra=()
  [[ $spot -eq 1 ]] && extra=(--spot)
  run gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$accel" \
    --version "$version" "${proj[@]}" "${extra[@]}"
fi
run gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" "${proj[@]}" --worker=all \
  --command "mkdir -p $workdir"
run gcloud compute tpus tpu-vm scp --recurse "$repo/pyproject.toml" "$repo/README.md" "$repo/morpheus_jax" \
  "$name:$workdir/" --zone "$zone" "${proj[@]}" --worker=all
run gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" "${proj[@]}" --worker=all \
  --command "cd $workdir && pip install -q 'jax[tpu]' -e . && morpheus pretrain --no-progress$args"

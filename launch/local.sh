#!/usr/bin/env bash
# Run `morpheus pretrain` as N JAX processes on this machine, each with D simulated CPU
# devices, joined by jax.distributed (gloo collectives). Used by the tests; also the
# quickest way to exercise multi-host code paths without a cluster.
set -euo pipefail

usage() {
  cat <<'TXT'
usage: launch/local.sh [-n PROCESSES] [-d DEVICES] [-p PORT] [-l LOG_DIR] [--dry-run] [--] [pretrain args…]

  -n PROCESSES   number of processes (default 2)
  -d DEVICES     CPU devices per process (default 4)
  -p PORT        coordinator port on 127.0.0.1 (default: a free port)
  -l LOG_DIR     where processes 1… write their logs (default: run output goes to
                 LOG_DIR/process_<i>.log; process 0 prints to this terminal)
  --dry-run      print the commands instead of running them
  pretrain args  passed to every process: --config FILE and key=value overrides

SIGTERM/SIGINT are forwarded to every process (they finish the step, save a checkpoint
and exit 0). When a process fails, the others are sent SIGTERM and, GRACE seconds later
(MORPHEUS_KILL_GRACE, default 10), SIGKILL: without their peer they would block in a
collective. The exit status is that of the first process seen to fail (0 if none did).
TXT
}

procs=2 devices=4 port="" logdir="" dry=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    -n) procs="$2"; shift 2 ;;
    -d) devices="$2"; shift 2 ;;
    -p) port="$2"; shift 2 ;;
    -l) logdir="$2"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
python=${PYTHON:-python3}
if [[ -z "$port" ]]; then
  port=$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
logdir=${logdir:-.}
if [[ $dry -eq 1 ]]; then
  for ((i = 0; i < procs; i++)); do
    printf 'env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=%s %s -m morpheus_jax.cli pretrain --coordinator 127.0.0.1:%s --num-processes %s --process-id %s' \
      "$devices" "$python" "$port" "$procs" "$i"
    printf ' %q' "$@"
    printf '\n'
  done
  exit 0
fi
mkdir -p "$logdir"
pids=()
for ((i = 0; i < procs; i++)); do
  args=(-m morpheus_jax.cli pretrain --coordinator "127.0.0.1:$port" --num-processes "$procs" --process-id "$i" "$@")
  if [[ $i -eq 0 ]]; then
    JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$devices" "$python" "${args[@]}" &
  else
    JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$devices" "$python" "${args[@]}" \
      --no-progress >"$logdir/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
declare -A index running
for i in "${!pids[@]}"; do index[${pids[$i]}]=$i; running[${pids[$i]}]=1; done
forward() { kill -s "$1" "${!running[@]}" 2>/dev/null || true; }
trap 'forward TERM' TERM
trap 'forward INT' INT
status=0 killer=""
while [[ ${#running[@]} -gt 0 ]]; do
  for pid in "${pids[@]}"; do  # in process order: of failures seen together, the lowest index's wins
    [[ -n "${running[$pid]:-}" ]] || continue
    kill -0 "$pid" 2>/dev/null && continue
    if wait "$pid"; then rc=0; else rc=$?; fi  # already exited: its saved status
    unset "running[$pid]"
    if [[ $rc -ne 0 && $status -eq 0 ]]; then
      status=$rc
      echo "launch/local.sh: process ${index[$pid]} exited with status $rc; stopping the others" >&2
      forward TERM
      if [[ ${#running[@]} -gt 0 ]]; then
        (sleep "${MORPHEUS_KILL_GRACE:-10}"; kill -KILL "${!running[@]}") >/dev/null 2>&1 &
        killer=$!
      fi
    fi
  done
  [[ ${#running[@]} -eq 0 ]] || sleep 0.2
done
[[ -z "$killer" ]] || kill "$killer" 2>/dev/null || true
exit "$status"

#!/usr/bin/env bash
# Runs one multi-process training job on this machine: NUM_PROCESSES copies of
# `python -m mrl_jax.main ARGS...`, joined through a coordinator on localhost.
#
#   launch/local.sh --config configs/quickstart.py:runlocal --workdir /tmp/mrl_local
#   NUM_PROCESSES=4 CPU_DEVICES_PER_PROCESS=2 launch/local.sh --config ... --workdir ...
#
# Every argument goes to mrl_jax.main unchanged. Variables:
#   NUM_PROCESSES            processes to start (default 2).
#   CPU_DEVICES_PER_PROCESS  if set, each process runs on CPU with this many
#                            devices (JAX_PLATFORMS=cpu and XLA's host device
#                            count): a multi-host run rehearsed on one machine.
#   GPUS_PER_PROCESS         if set, process i sees only GPUs
#                            [i*GPUS_PER_PROCESS, (i+1)*GPUS_PER_PROCESS).
#   COORDINATOR_PORT         coordinator port on 127.0.0.1 (default: a free one).
#   LOG_DIR                  where process i writes process_i.log
#                            (default ./launch_logs/local_<date>_<pid>).
#   PYTHON                   interpreter (default python3).
#   DRY_RUN=1                print each process's command and exit.
#
# Process 0's log is followed on the console. If any process fails, the others
# are stopped (they would otherwise wait on it in a collective) and the script
# exits with the first failure's status. SIGINT/SIGTERM are passed on to every
# process as SIGTERM, on which it saves a checkpoint and exits (mrl_jax/train.py).
set -euo pipefail

NUM_PROCESSES="${NUM_PROCESSES:-2}"
PYTHON="${PYTHON:-python3}"
LOG_DIR="${LOG_DIR:-./launch_logs/local_$(date +%Y%m%d_%H%M%S)_$$}"
DRY_RUN="${DRY_RUN:-0}"

if ! [[ "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: NUM_PROCESSES must be a positive integer, got '$NUM_PROCESSES'" >&2
  exit 2
fi
if [[ -z "${COORDINATOR_PORT:-}" ]]; then
  COORDINATOR_PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi

# The environment of process $1, as NAME=VALUE words for `env`.
process_env() {
  local i="$1"
  local vars=("MRL_COORDINATOR_ADDRESS=127.0.0.1:${COORDINATOR_PORT}"
              "MRL_NUM_PROCESSES=${NUM_PROCESSES}" "MRL_PROCESS_ID=${i}")
  if [[ -n "${CPU_DEVICES_PER_PROCESS:-}" ]]; then
    vars+=("JAX_PLATFORMS=cpu"
           "XLA_FLAGS=${XLA_FLAGS:-} --xla_force_host_platform_device_count=${CPU_DEVICES_PER_PROCESS}")
  fi
  if [[ -n "${GPUS_PER_PROCESS:-}" ]]; then
    local first=$((i * GPUS_PER_PROCESS)) ids="" g
    for ((g = first; g < first + GPUS_PER_PROCESS; g++)); do ids+="${ids:+,}$g"; done
    vars+=("CUDA_VISIBLE_DEVICES=${ids}")
  fi
  printf '%s\n' "${vars[@]}"
}

if [[ "$DRY_RUN" == 1 ]]; then
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    mapfile -t vars < <(process_env "$i")
    printf '%q ' env "${vars[@]}" "$PYTHON" -m mrl_jax.main "$@"
    printf '> %q 2>&1 &\n' "$LOG_DIR/process_$i.log"
  done
  exit 0
fi

mkdir -p "$LOG_DIR"
# Every log exists before any process starts: a child opens its own redirection
# only once it runs, so one killed early (another failed first) would leave none.
for ((i = 0; i < NUM_PROCESSES; i++)); do
  : > "$LOG_DIR/process_$i.log"
done
pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  mapfile -t vars < <(process_env "$i")
  env "${vars[@]}" "$PYTHON" -m mrl_jax.main "$@" > "$LOG_DIR/process_$i.log" 2>&1 &
  pids+=("$!")
done
echo "local.sh: ${NUM_PROCESSES} processes (coordinator 127.0.0.1:${COORDINATOR_PORT}), logs in ${LOG_DIR}/"

# GNU tail stops by itself once process 0 is gone, after printing the rest of
# its log; another tail is stopped when every process is done and may miss the
# last lines (they stay in the log).
follow=()
if tail --pid=$$ -n 0 /dev/null >/dev/null 2>&1; then follow=(--pid="${pids[0]}"); fi
tail -n +1 -F ${follow[@]+"${follow[@]}"} "$LOG_DIR/process_0.log" 2>/dev/null &
tail_pid=$!

# Sends signal $1 to every process still running.
signal_all() {
  local pid
  for pid in "${pids[@]}"; do
    if [[ -n "$pid" ]]; then kill "-$1" "$pid" 2>/dev/null || true; fi
  done
}
trap 'signal_all TERM' INT TERM

# Poll rather than `wait -n`: it must notice a failure in any process while
# the others still run (bash reaps exited children and keeps their status).
status=0
running="$NUM_PROCESSES"
while ((running > 0)); do
  for i in "${!pids[@]}"; do
    pid="${pids[$i]}"
    if [[ -z "$pid" ]] || kill -0 "$pid" 2>/dev/null; then
      continue
    fi
    rc=0
    wait "$pid" || rc=$?
    pids[i]=""
    running=$((running - 1))
    if ((rc != 0)); then
      echo "local.sh: process $i exited with status $rc (log: $LOG_DIR/process_$i.log)" >&2
      if ((status == 0)); then
        status="$rc"
        # KILL, not TERM: a checkpoint save would wait forever for the dead process.
        signal_all KILL
      fi
    fi
  done
  sleep 1
done

if ((${#follow[@]})); then
  for ((t = 0; t < 20; t++)); do  # tail looks for process 0 about once a second
    kill -0 "$tail_pid" 2>/dev/null || break
    sleep 0.5
  done
fi
kill "$tail_pid" 2>/dev/null || true
wait "$tail_pid" 2>/dev/null || true
if ((status != 0)); then
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    echo "----- last lines of process_$i.log" >&2
    tail -n 15 "$LOG_DIR/process_$i.log" >&2 || true
  done
fi
exit "$status"

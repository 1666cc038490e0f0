#!/usr/bin/env bash
# Starts a command on one TPU VM worker, detached from the ssh session, logging to
# ~/fmjax_logs/train.log. `fmjax launch run` calls it on every worker:
#
#   env KEY=VALUE ... bash launch/worker_run.sh .venv/bin/fmjax train --config=... --workdir=...
#
# Detached because a pod run outlives the laptop that launched it; `fmjax launch logs` reads the
# log. A run this script started before is stopped first: it holds the TPU, and a second process
# could not open it.
set -euo pipefail
if [ "$#" -eq 0 ]; then
  echo "usage: worker_run.sh COMMAND [ARGS...]" >&2
  exit 2
fi

log_dir="$HOME/fmjax_logs"
pid_file="$log_dir/train.pid"
mkdir -p "$log_dir"

if [ -f "$pid_file" ]; then
  old=$(cat "$pid_file")
  if kill -0 "$old" 2>/dev/null; then
    echo "worker $(hostname): stopping the previous run (pid $old)"
    # It may exit between the check and the kill; under set -e a failed kill would abort this start.
    kill "$old" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$old" 2>/dev/null || break; sleep 1; done
    kill -9 "$old" 2>/dev/null || true
  fi
fi
if [ -f "$log_dir/train.log" ]; then
  mv "$log_dir/train.log" "$log_dir/train.$(date +%Y%m%d-%H%M%S).log"
fi

nohup "$@" >"$log_dir/train.log" 2>&1 </dev/null &
echo $! >"$pid_file"
echo "worker $(hostname): started pid $! ($*); log $log_dir/train.log"

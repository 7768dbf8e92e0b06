#!/usr/bin/env bash
# One node's agents, in the foreground (run by examples/slurm/agents.sbatch through srun, one task
# per node; usable on its own too):  node_agents.sh BASE [agent options...]
#
# GPUs: those the scheduler allocated to this node (CUDA_VISIBLE_DEVICES); the agent's --gpu N
# indexes that list. None allocated: $GPUPOOL_CPU_AGENTS CPU agents (default 1), never the
# node's unallocated GPUs. Returns when every agent has exited (non-zero if one failed).
set -uo pipefail
home=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
base=${1:?usage: node_agents.sh BASE [agent options...]}
shift
cd "$home"
export PYTHONPATH="$home${PYTHONPATH:+:$PYTHONPATH}"

gpus=()
case "${CUDA_VISIBLE_DEVICES:-}" in
  "" | NoDevFiles | -1) ;;
  *) IFS=, read -ra gpus <<<"$CUDA_VISIBLE_DEVICES" ;;
esac
if [ "${#gpus[@]}" -gt 0 ]; then
  n=${#gpus[@]}
  cpu=()
else
  n=${GPUPOOL_CPU_AGENTS:-1}
  cpu=(--cpu)
fi

# Under Slurm every process of the step gets the signal itself (scancel, --signal): the agents
# then finish their current chunk and exit, and we only wait. A second SIGTERM would make them
# stop at once, so pass it on only when not running under srun.
pids=()
on_signal() {
  echo "node_agents: $(hostname): stop requested"
  if [ -z "${SLURM_STEP_ID:-}" ]; then kill -TERM "${pids[@]}" 2>/dev/null; fi
}
trap on_signal TERM INT

for ((i = 0; i < n; i++)); do
  "${PYTHON:-python3}" -m agent --base "$base" --gpu "$i" "${cpu[@]}" "$@" </dev/null &
  pids+=($!)
done
echo "node_agents: $(hostname): started $n ${cpu[*]:+CPU }agent(s) (pids ${pids[*]}; CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-})"

rc=0
for p in "${pids[@]}"; do
  while :; do
    wait "$p"
    code=$?
    kill -0 "$p" 2>/dev/null || break # wait returned for a signal: the agent still runs
  done
  [ "$code" -eq 0 ] || rc=$code
done
echo "node_agents: $(hostname): all $n agent(s) exited (status $rc)"
exit "$rc"

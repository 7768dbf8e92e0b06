#!/usr/bin/env bash
# One node's agents, in the foreground (run by examples/slurm/agents.sbatch through srun, one task
# per node; usable on its own too):  node_agents.sh BASE [agent options...]
#
# GPUs: those the scheduler allocated to this node (CUDA_VISIBLE_DEVICES); the agent's --gpu N
# indexes that list. None allocated: $GPUPOOL_CPU_AGENTS CPU agents (default 1), never the
# node's unallocated GPUs. Returns when every agent has exited (non-zero if one failed).
# $GPUPOOL_GPUS_PER_AGENT=K: one agent per K allocated GPUs (--gpu 0,1 then 2,3 ...; the allocation
# must be a multiple of K). $GPUPOOL_SLOTS=K: K agents sharing each allocated GPU (--slots K).
set -uo pipefail
home=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
base=${1:?usage: node_agents.sh BASE [agent options...]}
shift
cd "$home"
# python -m agent of this checkout, which goes on the agent's own sys.path only (never PYTHONPATH,
# which the agents' jobs would inherit)
agent='import sys; sys.path[0] = sys.argv.pop(1)
from gpupool.agent.__main__ import main
sys.exit(main())'

gpus=()
case "${CUDA_VISIBLE_DEVICES:-}" in
  "" | NoDevFiles | -1) ;;
  *) IFS=, read -ra gpus <<<"$CUDA_VISIBLE_DEVICES" ;;
esac
per=${GPUPOOL_GPUS_PER_AGENT:-1}
slots=${GPUPOOL_SLOTS:-1}
specs=() # one agent each: its --gpu (and --slots/--slot) arguments
if [ "${#gpus[@]}" -gt 0 ]; then
  cpu=()
  if ! [[ $per =~ ^[1-9][0-9]*$ && $slots =~ ^[1-9][0-9]*$ ]]; then
    echo "node_agents: GPUPOOL_GPUS_PER_AGENT=$per and GPUPOOL_SLOTS=$slots must be whole numbers of at least 1" >&2
    exit 2
  fi
  if [ $((${#gpus[@]} % per)) -ne 0 ]; then
    echo "node_agents: $(hostname): ${#gpus[@]} GPU(s) allocated (CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES) do not" \
      "split into agents of GPUPOOL_GPUS_PER_AGENT=$per; ask Slurm for a multiple of $per" >&2
    exit 2
  fi
  for ((g = 0; g < ${#gpus[@]}; g += per)); do
    list=$g
    for ((k = 1; k < per; k++)); do list+=",$((g + k))"; done
    if [ "$slots" -gt 1 ]; then
      for ((j = 0; j < slots; j++)); do specs+=("$list --slots $slots --slot $j"); done
    else
      specs+=("$list")
    fi
  done
else
  for ((i = 0; i < ${GPUPOOL_CPU_AGENTS:-1}; i++)); do specs+=("$i"); done
  cpu=(--cpu)
fi
n=${#specs[@]}

# Under Slurm every process of the step gets the signal itself (scancel, --signal): the agents
# then finish their current chunk and exit, and we only wait. A second SIGTERM would make them
# stop at once, so pass it on only when not running under srun.
pids=()
on_signal() {
  echo "node_agents: $(hostname): stop requested"
  if [ -z "${SLURM_STEP_ID:-}" ]; then kill -TERM "${pids[@]}" 2>/dev/null; fi
}
trap on_signal TERM INT

for spec in "${specs[@]}"; do
  read -ra args <<<"$spec"
  "${PYTHON:-python3}" -c "$agent" "$home" --base "$base" --gpu "${args[@]}" "${cpu[@]}" "$@" </dev/null &
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

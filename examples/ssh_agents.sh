#!/usr/bin/env bash
# Start or stop pool agents on several machines over plain SSH: runs this checkout's
# ./start_agents.sh on every host given, in parallel, and reports each host's outcome.
#
#   examples/ssh_agents.sh N BASE HOST... [-- START_AGENTS OPTIONS...]
#   examples/ssh_agents.sh stop BASE HOST... [-- --now]
# examples:
#   examples/ssh_agents.sh 8 /shared/base gpu01 gpu02 gpu03        # 8 agents (GPUs 0..7) on each
#   examples/ssh_agents.sh 2 /shared/base cpu01 -- --cpu           # 2 CPU agents
#   examples/ssh_agents.sh 4 /shared/base gpu01 -- -- --poll-interval 0.2   # options for the agents
#   examples/ssh_agents.sh stop /shared/base gpu01 gpu02 gpu03     # each finishes its current chunk
#
# Every host must mount BASE at the same path and have this checkout at $GPUPOOL_HOME (default:
# this checkout's path here). $GPUPOOL_REMOTE_SETUP runs first on each host (e.g.
# 'source ~/venv/bin/activate'); $SSH is the ssh command (default: ssh -o BatchMode=yes).
# Agents are named <host>-gpu<N>: GPU 0 of every host is a different agent.
set -uo pipefail

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 3 ] || usage
what=$1 base=$2
shift 2
hosts=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do hosts+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
extra=("$@")
[ "${#hosts[@]}" -gt 0 ] || usage
case "$what" in
  stop) args=(stop "$base" "${extra[@]}") ;;
  '' | *[!0-9]*) echo "ssh_agents.sh: N must be a number of agents or 'stop', not '$what'" >&2; usage ;;
  *) args=("$what" "$base" "${extra[@]}") ;;
esac

home=${GPUPOOL_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
remote="cd $(printf %q "$home") && ${GPUPOOL_REMOTE_SETUP:+$GPUPOOL_REMOTE_SETUP && }./start_agents.sh$(printf ' %q' "${args[@]}")"
read -ra ssh <<<"${SSH:-ssh -o BatchMode=yes}"

pids=()
for h in "${hosts[@]}"; do
  # stdin from /dev/null: ssh must not eat this script's input; each line prefixed with its host
  ("${ssh[@]}" "$h" "$remote" </dev/null 2>&1 | sed -u "s/^/$h: /"; exit "${PIPESTATUS[0]}") &
  pids+=($!)
done
failed=()
for i in "${!hosts[@]}"; do
  wait "${pids[$i]}" || failed+=("${hosts[$i]}")
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "ssh_agents.sh: failed on ${#failed[@]} of ${#hosts[@]} host(s): ${failed[*]}" >&2
  exit 1
fi
echo "ssh_agents.sh: $what done on ${#hosts[@]} host(s): ${hosts[*]}"

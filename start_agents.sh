#!/usr/bin/env bash
# Start this host's pool agents in the background, or stop them.
#   ./start_agents.sh N BASE [--cpu] [-- agent options]   one agent per GPU 0..N-1
#   ./start_agents.sh stop BASE [--now]                   graceful stop
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m agent.launcher "$@"

#!/usr/bin/env bash
# Start this host's pool agents in the background, or stop them.
#   ./start_agents.sh N BASE [--cpu] [-- agent options]   one agent per GPU 0..N-1
#   ./start_agents.sh stop BASE [--now]                   graceful stop
# The pool imports itself as gpupool from this folder (gpupool.py), which goes on the launcher's
# own sys.path only: nothing of the checkout reaches the agents' jobs through PYTHONPATH.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python3}" -c 'import sys; sys.path[0] = sys.argv.pop(1); sys.argv[0] = sys.argv.pop(1)
from gpupool.agent.launcher import main
sys.exit(main())' "$here" "$0" "$@"

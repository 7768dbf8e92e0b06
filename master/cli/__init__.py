"""The command lines: main.py (run_cli), python -m master (pool_cli), the OctoRun drop-in and the demo."""

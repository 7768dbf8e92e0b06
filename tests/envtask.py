"""A task that reports its environment (tests of main.py --env)."""
import os


def env_of(names: str) -> dict:
    return {n: os.environ.get(n) for n in names.split(",")}

"""The scheduling core: one dispatcher and its two users (a run's feeder, the Executor's calls), liveness, placement, what state a chunk or a run is in, and the operations both command lines use."""

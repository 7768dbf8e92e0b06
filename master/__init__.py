"""What feeds and collects, in four parts: ``spec`` (what a run is: its options, its saved spec,
the checks of what a user gives), ``core`` (the dispatcher, a run's feeder, liveness, placement,
chunk and run states, the operations the command lines share), ``report`` (status, logs, collect,
progress, the dashboard) and ``cli`` (the command lines). At this level: the Python API
(``api``), the ``concurrent.futures`` Executor (``executor``, with ``calls`` and ``remote``), the
errors a command reports (``errors``) and the demo's task (``matmul``)."""

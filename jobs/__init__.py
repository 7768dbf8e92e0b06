"""The spool: the on-disk protocol between the master and the agents, under one folder BASE.

Layout (every name below is built by ``jobs.paths.Spool``, nowhere else)::

    BASE/agent_pool/<agent>.POOL     mailbox: {"schema", "agent", "jobs": [job descriptor, ...]}
    BASE/agent_pool/<agent>.lock     permanent lock guarding every read-modify-write of the mailbox
    BASE/agent_pool/.tmp/            the temp files of mailbox writes (a folder no agent watches)
    BASE/agents/<agent>.json         heartbeat/status, replaced every few seconds by the agent
    BASE/agents/<agent>.lock         held by the agent for its whole life (one process per agent id)
    BASE/agents/<agent>.drain        present = the agent takes no new job (``master drain``)
    BASE/runs/<run>/run.json         the run spec, written by the master; a run with --after names the
                                     runs it starts after, and waits (its state: after) while one of
                                     them is neither sealed nor cancelled (``master.core.after``)
    BASE/runs/<run>/master.lock      held by the one master feeding the run (holder in the file)
    BASE/runs/<run>/cancel           present = the run is cancelled ({"stop_running": bool})
    BASE/runs/<run>/sealed           present = the run is over and its results are flushed to disk: empty,
                                     it finished; {"halted": why}, its master stopped it early
                                     (--max-failures), and only a finished run's names are trusted
    BASE/runs/<run>/on_done.json     its --on-done hook, claimed (made exclusively) by the master that
                                     runs it before it starts it, then its exit code; removed with the
                                     seal, so the hook runs once each time the run is sealed
    BASE/runs/<run>/owner            who submitted the run first ({"uid", "user"}; ``jobs.owners``);
                                     commands acting on another user's run want --force
    BASE/runs/<run>/epoch            a token drawn anew when the run is started afresh (--fresh);
                                     every job carries it, and so does every result it commits; an
                                     agent drops the result of a job whose epoch is no longer the
                                     run's (checked just before the commit), and masters and readers
                                     refuse a result of another epoch (jobs.results.StaleResult)
    BASE/results/<run>/<chunk:06d>.json      the chunk's committed result (the commit point)
    BASE/results/<run>/<chunk:06d>.a<N>.npz  the arrays of attempt N, in place before its .json
                                     appears; the .json names them in "arrays" ("arrays_form":
                                     "tuple"/"list" when returned as a sequence: arr_0, arr_1...)
    BASE/results/<run>/<chunk:06d>.a<N>.json history: every failed attempt N
    BASE/logs/<agent>.log            agent log (loguru); <agent>.worker.log: the worker's output
    BASE/logs/<agent>.out            what a started agent printed before its log took over
    BASE/logs/<run>/<chunk:06d>.log  output of script and command jobs
    BASE/logs/<run>/master.log       what the run's detached master printed (main.py --detach)
    BASE/alloc/alloc.lock            held by the one Slurm allocator of the spool (``master.alloc``)
    BASE/alloc/<jobid>.json          one allocation it submitted: its Slurm state, nodes, the agents
                                     seen from it (``master.core.allocs``); written by the allocator alone
    BASE/logs/alloc.log              the allocator's log when it runs detached
    BASE/rejected/<name> + <name>.why  spool files refused as broken or hostile, with the reason
    BASE/demo-input/                 the demo's input files (``python main.py`` without ``--task``)
    /tmp/gpupool-locks/gpu-<uuid>.lock host-local: one agent per GPU on this host ($GPUPOOL_LOCK_DIR);
                                     slots sharing a GPU (--slots) hold it shared, an agent alone exclusive
    /tmp/gpupool-locks/gpu-<uuid>.s<J>.lock  host-local: slot J of a shared GPU, one agent each
    /tmp/gpupool-locks/gpu-<uuid>.s<J>.mem   host-local: the GPU memory slot J promised its job (--gpu-mem),
                                     written and read under gpu-<uuid>.mem.lock (agent.gpumem)

Agent ids are ``<host>-gpu<N>`` (N: the NVML index) or ``<host>-cpu<N>`` (a local rank), so two
hosts sharing BASE never collide; ``<host>-gpu<N>+<M>`` holds GPUs N and M, ``<host>-gpu<N>s<J>`` is
slot J of GPU N (docs/multigpu.md).

Publishing: every file another process reads is written to ``.<name>.tmp-<pid>-<rand>`` in the
same folder (a mailbox: in ``agent_pool/.tmp``, so that its watchers see one event, not a rename
pair; see ``Spool.mailbox_temp_dir``), flushed and renamed over the final name (``jobs.atomic``). Readers skip names that
start with ``.``; nobody ever sees a half-written file. Run specs are also fsynced before the
rename. Results are not fsynced one by one (the largest cost between two jobs): when a run is
done the master flushes its results with one syncfs and writes ``runs/<run>/sealed``; a master
resuming a run that is not sealed reads and checks every result (JSON, and the size of its
arrays), so a result torn by an OS crash is rejected and its chunk runs again. Mailboxes and
heartbeats are never fsynced: a rename alone makes them atomic for every other process, and
after an OS crash both are rebuilt (the master recomputes what is in flight from results, an
agent rewrites its heartbeat).

Who writes what, in which order:

1. master: ``runs/<run>/master.lock`` (non-blocking; a second master is refused), ``run.json``.
2. master: under ``<agent>.lock``, read the mailbox, append job descriptors (run, chunk,
   attempt, ...) of chunks that have no result and are in no mailbox, write it back. It only
   appends to agents whose heartbeat is fresh, breadth first, and keeps in each only as many
   of its run's jobs as hide the round trip (``master.core.dispatcher``). To move a job that has
   not started to an idle agent, it removes it under the same lock and queues it elsewhere
   with attempt + 1 (never the first of that agent's open jobs, nor one its heartbeat shows
   running or handed to its worker; if the agent read its mailbox just before and runs it
   anyway, link() still commits one result).
3. agent: read its mailbox (no lock needed: it is only ever replaced by rename); take the
   first job whose chunk has no committed result, of the run furthest below its share of
   this agent's time when several runs have jobs there (``agent.fairshare``); run it.
4. agent: commit (``jobs.results.commit``, no lock): if the final ``.json`` is absent, move the
   arrays to this attempt's own ``<chunk>.a<N>.npz``, then ``link`` the ``.json`` into
   place (fails if it exists: exactly one committed result per chunk, whichever attempt
   finishes first). A failed attempt first writes its history ``.a<N>.json``; only the last
   attempt then commits a final (failed) ``.json``. So a final result without any history is
   an ok one, and a sealed run's outcome can be read from file names alone. A commit that
   fails for lack of space is tried again until it passes (the outcome is kept, nothing is run
   again); one that fails for another reason (permission denied, read-only) is named in the
   agent's heartbeat (``uncommitted``) and the master records that attempt's failure itself.
5. A job stays in the mailbox until its outcome is on disk, so a dead agent's work is still
   listed there. Finished jobs are pruned lazily, under ``<agent>.lock``: by the master when
   it refills that mailbox, and by the agent when it runs out of work and its mailbox has
   looked the same for a while (through a shared filesystem a fresher write may not show yet:
   a prune based on a stale read would drop it). A mailbox rewrite per job would cost a file
   creation per job; the agent remembers what it finished meanwhile.
6. master: sees the final ``.json`` (done) or the history of the attempt it dispatched, when
   attempts are left (retry after a capped exponential back-off with attempt + 1). An agent whose heartbeat ``seq`` has
   not changed for ``dead_after`` seconds of the master's own clock is dead: under its mailbox
   lock (or without it, if a process that may be frozen has held it for 5 s) the master
   removes this run's jobs and queues them again with attempt + 1. A job that
   left a live agent's mailbox with no result at all (for ``dead_after``) is queued again the
   same way. The jobs a dead agent may have been running (the first one with no outcome, and
   the next one, which its worker may have started while the agent committed the first) are
   queued with ``"alone": true``: the agent hands the worker nothing ahead of or beside such a
   job, so that a later death under it is surely its own and costs an attempt (``AgentLost``).
   An agent restarted under the same id (a supervisor brings it back within a second, so its
   heartbeat never goes stale) is told apart by its heartbeat's host name, pid and start time;
   the new process lists in ``died_under`` the open jobs its predecessor may have died under
   (named by its last heartbeat, else the first open ones) and leaves them alone for 30 s,
   and masters treat them as a dead agent's (``master.core.dispatcher.Dispatcher._restarted``).
   A last attempt taken back free (dead, frozen or draining agent, vanished, moved) gets a
   ``Superseded`` history record first: should it still run somewhere and fail, that failure
   stays history (``jobs.results.commit`` writes history with ``link``) and never commits
   over the attempt that replaced it.

Descriptors grow (``jobs.descriptor``, "How descriptors grow"): a field added later has a default
and is written only when it differs from it. A field an older agent may ignore is just added. One
it may not ignore raises the schema of the jobs that use it to the version that introduced it.
An agent refuses (``rejected/``) a descriptor of a schema newer than it reads and ignores unknown
fields in one it reads; its heartbeat says the highest schema it reads (``job_schema``, absent:
1), and masters queue a job only at agents that read its schema (a run that no live agent can
read fails at once, naming the agents to restart on the newer version). Mailboxes and heartbeats
follow the same rule: unknown fields are ignored, a newer ``schema`` is refused.

Everything read from the spool is untrusted: sizes are bounded, symlinks are not followed
(O_NOFOLLOW; nor written through: a link at a log, or at a folder on the way to a log or a result,
is moved to ``rejected/``, see ``Spool.real_dir`` and ``Spool.open_log``), names are validated
(``jobs.names``), ``.npz`` files are read with ``allow_pickle=False``, and a broken file is moved
to ``rejected/`` with a ``.why`` note.
"""

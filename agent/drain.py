"""Drain state: an agent with a drain flag (``agents/<agent>.drain``: ``python -m master drain``,
or the agent itself, ``agent.gpufaults``) takes no new job, and its heartbeat says 'draining' at
once, so that masters take back what is queued here; ``python -m master undrain`` removes it.

The agent's loop asks ``Drain.follow`` before it chooses a job and reports ``reported()`` as its
state; ``raise_flag`` is how it drains itself.
"""
from __future__ import annotations

import json
import os
import socket
import time

from gpupool.jobs.logsetup import logger

from gpupool.jobs.heartbeat import AgentState
from gpupool.jobs.paths import Spool


class Drain:
    def __init__(self, spool: Spool, agent_id: str) -> None:
        self.spool, self.agent_id = spool, agent_id

    def flagged(self) -> bool:
        return self.spool.drain_flag(self.agent_id).exists()

    def follow(self, state: AgentState) -> AgentState | None:
        """The state an agent in ``state`` moves to as its drain flag came or went (said in the
        log), or None where nothing changed."""
        drain = self.flagged()
        if drain == (state is AgentState.DRAINING):
            return None
        logger.info("agent {}: {}", self.agent_id, "draining: no new jobs" if drain else "drain lifted")
        return AgentState.DRAINING if drain else AgentState.IDLE

    def reported(self, state: AgentState) -> AgentState:
        """A busy agent with a drain flag says 'draining' at once, so that masters take its
        queued jobs back without waiting for the running chunk to end."""
        if state is AgentState.BUSY and self.flagged():
            return AgentState.DRAINING
        return state

    def raise_flag(self, why: str) -> bool:
        """Write this agent's drain flag, with who set it, when and ``why``; False (said in the log)
        where it cannot be written."""
        note = {"by": f"{socket.gethostname()}:{os.getpid()}", "at": time.time(), "agent": self.agent_id, "why": why}
        try:
            self.spool.write_over(self.spool.drain_flag(self.agent_id), json.dumps(note).encode(), "flag")
        except OSError as e:
            logger.error("agent {}: cannot write its drain flag ({}); it goes on taking jobs", self.agent_id, e)
            return False
        return True

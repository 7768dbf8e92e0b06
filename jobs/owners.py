"""Whose a run or an agent is (issue 23): a guard against mistakes between colleagues who share
a spool, not a security boundary (whoever can write the spool can run code as the agents' user;
docs/failures.md, "Trust model").

A run belongs to whoever first submitted it: ``runs/<run>/owner`` ({"uid", "user"}), written by
its master under the run's master lock when the run has none, and kept as long as the run is
(resumes, ``--fresh``, ``retry``; ``rm`` removes it). It is a file of its own, not a field of
``run.json``, so that it is never part of what makes two submissions the same run, and tools of
earlier releases, which refuse fields they do not know in ``run.json``, still read every run. A
run made before owners were recorded belongs to the owner of its ``runs/<run>`` folder. An
agent belongs to the user it runs as (``uid``/``user`` in its heartbeat). An owner that cannot
be found out (an older agent's heartbeat, a folder that cannot be read) is unknown, and
anyone may act on it.

The commands that act on a run or an agent of someone else (``cancel``, ``rm``, ``retry``,
``drain``, ``undrain``, ``main.py`` resuming a run of that name) refuse unless told ``--force``.
Users are told apart by uid; root is no exception.
"""
from __future__ import annotations

import json
import os
import pwd
from dataclasses import dataclass
from typing import Any

from gpupool.jobs.errors import SpoolError
from gpupool.jobs.jsonio import is_int, is_str, read_json
from gpupool.jobs.paths import Spool

OWNER_LIMIT = 4096


class NotOwner(SpoolError):
    """A command was asked to act on another user's run or agent without ``--force``."""


@dataclass(frozen=True)
class Owner:
    """A user: ``uid`` None when unknown. ``user``: the name the passwd database gave the uid
    where the owner was recorded (its uid as text where it had none)."""

    uid: int | None
    user: str | None

    @property
    def known(self) -> bool:
        return self.uid is not None

    def is_me(self) -> bool:
        """True for the user this process runs as, and for an unknown owner (anyone may act)."""
        return self.uid is None or self.uid == os.geteuid()

    def __str__(self) -> str:
        if self.uid is None:
            return "an unknown user"
        return f"uid {self.uid}" if self.user in (None, str(self.uid)) else f"{self.user} (uid {self.uid})"

    def to_dict(self) -> dict[str, Any]:
        return {"uid": self.uid, "user": self.user}


UNKNOWN = Owner(None, None)


def user_name(uid: int) -> str:
    """The passwd name of ``uid``, or the uid as text where it has no entry (a container's, a
    cluster's user unknown on this host)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return str(uid)


def me() -> Owner:
    """The user this process runs as (its effective uid: the one its files are made with)."""
    uid = os.geteuid()
    return Owner(uid, user_name(uid))


def run_owner(spool: Spool, run: str) -> Owner:
    """Who ``run`` belongs to: its recorded owner, else (a run of an earlier release, or an owner
    file that cannot be read) the owner of its ``runs/<run>`` folder, else unknown."""
    try:
        d = read_json(spool.owner_file(run), "run owner", OWNER_LIMIT)
        if isinstance(d, dict) and is_int(d.get("uid")) and d["uid"] >= 0:
            return Owner(d["uid"], _name(d.get("user"), d["uid"]))
    except (OSError, SpoolError):  # none (an earlier release's run), or unreadable
        pass
    try:
        uid = os.stat(spool.run_dir(run)).st_uid
    except (OSError, SpoolError):
        return UNKNOWN
    return Owner(uid, user_name(uid))


def claim_run(spool: Spool, run: str) -> Owner:
    """Record the owner of ``run`` where none is yet (a new run: this user; a run of an earlier
    release: the owner of its folder); returns it. Called by the run's master, under its lock."""
    path = spool.owner_file(run)
    owner = run_owner(spool, run)
    if os.path.lexists(path) or not owner.known:
        return owner
    spool.write_over(path, json.dumps(owner.to_dict()).encode(), "owner")
    return owner


def agent_owner(heartbeat: Any) -> Owner:
    """Who an agent belongs to, from its heartbeat (``jobs.heartbeat.Heartbeat``, or None): the
    user it runs as; unknown for a heartbeat of an earlier release."""
    uid = getattr(heartbeat, "uid", None)
    if not is_int(uid) or uid < 0:
        return UNKNOWN
    return Owner(uid, _name(getattr(heartbeat, "user", None), uid))


def _name(user: Any, uid: int) -> str:
    """A user name read from the spool, if it is one a terminal shows as it is; else the uid."""
    return user if is_str(user) and 0 < len(user) <= 64 and user.isprintable() else str(uid)


def refuse(what: str, owner: Owner, force: bool, doing: str, hint: str | None = None) -> None:
    """Raise ``NotOwner`` naming ``owner`` when ``what`` ("run R", "agent A") is not this user's
    and ``force`` is not given; ``doing`` is what ``--force`` would do anyway ("cancel it");
    ``hint``, where there is no ``--force`` to pass, says what to do instead."""
    if force or owner.is_me():
        return
    root = " (root too: owners guard against mistakes, see docs/failures.md)" if os.geteuid() == 0 else ""
    raise NotOwner(f"{what} belongs to {owner}; {hint or f'pass --force to {doing} anyway'}{root}")


def check_run(spool: Spool, run: str, force: bool, doing: str, hint: str | None = None) -> Owner:
    """``refuse`` for a run; returns its owner."""
    owner = run_owner(spool, run)
    refuse(f"run {run}", owner, force, doing, hint)
    return owner

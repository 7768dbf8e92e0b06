"""A script job (run as ``python forking_script.py --pidfile P ...``) that forks a child in its own
process group and a detached one (setsid), writes their pids, and exits 0 at once."""
import os
import sys
import time


def _write_pid(pidfile: str, pid: int) -> None:
    with open(pidfile + ".tmp", "w") as f:
        f.write(str(pid))
    os.replace(pidfile + ".tmp", pidfile)


if __name__ == "__main__":
    pidfile = sys.argv[sys.argv.index("--pidfile") + 1]
    kids = []
    for detach in (False, True):
        child = os.fork()
        if child == 0:
            if detach:
                os.setsid()
            time.sleep(3600)
            os._exit(0)
        kids.append(child)
    _write_pid(pidfile, kids[0])
    _write_pid(pidfile + ".detached", kids[1])
    sys.exit(0)

"""CPU seconds a process and its descendants used, from /proc (Linux): what a runner
costs per item, counted the same way for Konstruct (worker, Temporal server,
PostgreSQL), the naive runner (this process) and the peer (its subprocess)."""

from __future__ import annotations

import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def _fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # After the command name (in parentheses, which may hold spaces): state, ppid, ...
    return text.rsplit(")", 1)[1].split()


def tree_cpu_s(root: int) -> float:
    """utime + stime of `root` and every live descendant, plus what their reaped
    children used (cutime + cstime): a process that ends moves from one to the other."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _fields(int(entry.name))
            if fields is not None:
                parents[int(entry.name)] = int(fields[1])
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    ticks = 0
    for pid in tree:
        fields = _fields(pid)
        if fields is not None:
            ticks += sum(int(f) for f in fields[11:15])
    return ticks / _TICK


def postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postmaster.pid").read_text().split()[0])

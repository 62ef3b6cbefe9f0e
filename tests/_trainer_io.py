"""Reading what a running trainer writes: its JSON-lines events and its ASE database."""

import json
import time


def read_events(path):
    """The trainer's events so far (a line still being written is skipped)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def while_unlocked(read, path, tries=50):
    """``read(db)`` on the ASE database at ``path``, retrying while the trainer holds it."""
    from ase.db import connect

    for _ in range(tries):
        try:
            return read(connect(str(path), type="db"))
        except Exception as exc:  # noqa: BLE001 - sqlite busy while the trainer writes
            # also transient: the trainer creating the database (tables there, ase's version
            # row not yet: ase's reader fails with a TypeError on the missing row)
            if ("locked" not in str(exc) and "no such table" not in str(exc)
                    and not isinstance(exc, TypeError)):
                raise
            time.sleep(0.1)
    raise AssertionError(f"{path} stayed locked")

"""Process titles, as `ps` shows them: `flotilla::head`, `flotilla::replica:<app>:<deployment>`...

Operators (and tests) find a cluster's processes by these names, as Ray's show
`ray::ServeReplica:...`. Without `setproctitle` installed this does nothing.
"""

from __future__ import annotations


def set_title(title: str) -> None:
    """Set this process's title (its command line in `ps`, and its name, cut to 15 bytes)."""
    try:
        import setproctitle
    except ImportError:  # pragma: no cover
        return
    setproctitle.setproctitle(title)
    setproctitle.setthreadtitle(title)

"""Entry point of the head process: start the zygote first, then import and run the head.

The zygote's preloading (~0.2 s) then overlaps with the head's own imports.
"""

import json
import os
import subprocess
import sys

if __name__ == "__main__":
    from flotilla._private.proctitle import set_title

    set_title("flotilla::head")
    from flotilla._private.keeper import keeper_from_env

    keeper = keeper_from_env()
    if keeper is not None:  # die with the keeper (replicas and the proxy watch it too)
        from flotilla._private.zygote import die_with_parent

        die_with_parent()
        if os.getppid() != keeper[0]:
            sys.exit(1)
    # A restarted head (the keeper counts restarts) is ready sooner without the zygote's
    # preloading competing for the CPU: it starts the zygote once it serves (`head.Head.run`).
    restarted = bool(json.loads(sys.argv[1]).get("restarts"))
    zygote = None if restarted else subprocess.Popen(
        [sys.executable, "-m", "flotilla._private.zygote"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    from flotilla._private import head

    head.main(zygote)

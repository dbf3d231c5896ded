"""Entry point of the head process: start the zygote first, then import and run the head.

The zygote's preloading (~0.2 s) then overlaps with the head's own imports.
"""

import subprocess
import sys

if __name__ == "__main__":
    zygote = subprocess.Popen(
        [sys.executable, "-m", "flotilla._private.zygote"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    from flotilla._private import head

    head.main(zygote)

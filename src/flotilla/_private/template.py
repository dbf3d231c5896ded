"""The template process of a `fork_after_init` deployment version.

It runs the deployment's constructor once (and the first `reconfigure`), then forks replicas
on request: a new replica starts with the object already built, so it is ready in
milliseconds, and what the constructor loaded (model weights on the CPU) is shared
copy-on-write between the template and every replica forked from it.

The head starts it (`python -m flotilla._private.template`) and speaks the zygote's protocol
with it (zygote.py), after one first line of its own:
  head -> template  {"log": path, "args": {...}, "spec": {"config", "def_bytes", "args_bytes"}}
                    (the byte strings base64-encoded; `args` as a replica's, without its id)
  template -> head  {"ready": pid} | {"failed": traceback} | {"unsafe": reason}
then, once ready, {"kind": "replica", "log", "args"} requests, answered as the zygote answers.
The protocol runs on private copies of stdin/stdout; the process's own stdout and stderr are
its log, so what the constructor prints cannot break it.

A template is unsafe to fork (it answers "unsafe" and exits; the head then starts replicas
the usual way) when the constructor left threads running (a fork copies only the calling
thread, so their locks and work would be lost in every replica), or initialised CUDA (a CUDA
context does not survive a fork). The head never asks for a template for a replica that
needs GPUs. Lifetime: as the zygote's, the template dies with the head (PR_SET_PDEATHSIG);
its replicas watch the session's keeper, not it.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import inspect
import json
import logging
import os
import signal
import sys
import threading
import traceback
from typing import Any

from flotilla._private import zygote
from flotilla._private.proctitle import set_title


def fork_unsafe() -> str:
    """Why forking this process now would break the replicas, in words; "" when it is safe."""
    others = [t.name for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive()]
    if others:
        return (f"the constructor left {len(others)} thread(s) running ({', '.join(sorted(others)[:5])}); "
                "a fork copies only the calling thread")
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    try:
        if cuda is not None and cuda.is_initialized():
            return "the constructor initialised CUDA (torch.cuda), and a CUDA context does not survive a fork"
    except Exception:  # an odd torch build: the driver check below still applies
        pass
    try:
        with open("/proc/self/maps") as f:
            if "libcuda.so" in f.read():
                return "the constructor loaded the CUDA driver (libcuda), and a CUDA context does not survive a fork"
    except OSError:
        pass
    return ""


def settle(result: Any) -> Any:
    """The value of `result`, awaiting it (on a loop of its own, closed after) when it is awaitable."""
    if inspect.isawaitable(result):

        async def wait() -> Any:
            return await result

        return asyncio.run(wait())
    return result


def build(args: dict[str, Any], spec: dict[str, Any]) -> Any:
    """Construct the deployment's object as a replica would, and give it its first user_config."""
    import cloudpickle

    from flotilla._private import replica

    replica.set_replica_context(args["app"], args["deployment"], f"template-{args.get('version', '')}")
    target = cloudpickle.loads(base64.b64decode(spec["def_bytes"]))
    init_args, init_kwargs = cloudpickle.loads(base64.b64decode(spec["args_bytes"]))
    built = settle(replica.instantiate(target, init_args, init_kwargs))
    user_config = spec["config"].get("user_config")
    if user_config is not None and not built.is_function:
        fn = getattr(built.obj, "reconfigure", None)
        if fn is None:
            raise RuntimeError("user_config was given but the deployment class defines no reconfigure(self, config)")
        settle(fn(user_config))
        built = built._replace(user_config=user_config)
    return built


def main() -> None:
    set_title("flotilla::template")
    zygote.die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    proto_in, proto_out = os.dup(0), os.dup(1)
    zygote._out_fd = proto_out
    stdin = os.fdopen(proto_in, "rb")
    first = json.loads(stdin.readline() or b"null")
    if not first:
        return
    args = first["args"]
    set_title(f"flotilla::template:{args['app']}:{args['deployment']}")
    zygote.redirect_output(first["log"])
    from flotilla._private.replica import main_forked, setup_process

    setup_process({**args, "replica_id": "template"}, own_log=False)  # its rotation thread: in replicas
    logger = logging.getLogger("flotilla.template")
    zygote.preload()
    try:
        built = build(args, first["spec"])
    except BaseException as e:
        tb = "".join(traceback.format_exception(e))
        logger.error("the constructor failed in the template:\n%s", tb)
        zygote._write({"failed": tb})
        return
    why = fork_unsafe()
    if why:
        logger.warning("not forking replicas from this template: %s", why)
        zygote._write({"unsafe": why})
        sys.stdout.flush()
        os._exit(0)  # its threads would keep a normal exit waiting
    gc.collect()
    gc.freeze()  # the collector never writes to what exists now: those pages stay shared
    logger.info("template ready (pid %d): forking replicas", os.getpid())
    sys.stdout.flush()
    sys.stderr.flush()
    zygote.serve_forks(stdin, lambda req: main_forked(req["args"], built), close=(proto_in, proto_out))
    os._exit(0)  # the head closed the protocol: no finalisers over the model's objects


if __name__ == "__main__":
    main()

"""serve.run, handles, composition, status, delete, route prefixes: real processes."""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import pytest

from flotilla import serve
from flotilla.exceptions import GetTimeoutError
from flotilla.serve.exceptions import ConfigError, DeploymentUnavailableError, RayServeException
from tests.conftest import wait_for

pytestmark = pytest.mark.slow


class MyError(Exception):
    pass


@serve.deployment
class Echo:
    def __init__(self, prefix: str = ""):
        self.prefix = prefix

    def __call__(self, x):
        return f"{self.prefix}{x}"

    async def add(self, a, b=0):
        return a + b

    def fail(self, kind):
        if kind == "value":
            raise ValueError("bad value 42")
        raise MyError("custom")

    def pid(self):
        return os.getpid()

    def context(self):
        ctx = serve.get_replica_context()
        return ctx.app_name, ctx.deployment, ctx.replica_tag


def test_run_returns_handle_and_calls_work(url):
    h = serve.run(Echo.bind("> "), name="echo", route_prefix="/echo")
    assert h.remote("hi").result() == "> hi"
    assert h.add.remote(1, b=2).result(timeout_s=10) == 3
    assert h.options(method_name="add").remote(5).result() == 5
    st = serve.status()
    app = st.applications["echo"]
    assert app.status == "RUNNING"
    assert app.deployments["Echo"].status == "HEALTHY"
    assert app.deployments["Echo"].replica_states == {"RUNNING": 1}
    assert [f"{k}" for k in app.deployments["Echo"].replica_states] == ["RUNNING"]  # plain str keys, as Ray's
    assert st.proxies and all(p == "HEALTHY" for p in st.proxies.values())


def test_user_exceptions_keep_their_type_and_traceback(url):
    h = serve.run(Echo.bind(), name="exc", route_prefix=None)
    with pytest.raises(ValueError, match="bad value 42") as info:
        h.fail.remote("value").result()
    assert "Traceback" in str(info.value) and "in fail" in str(info.value)
    with pytest.raises(MyError):
        h.fail.remote("custom").result()
    # The replica keeps serving after user errors.
    assert h.remote(1).result() == "1"


def test_unknown_method_raises(url):
    h = serve.run(Echo.bind(), name="nometh", route_prefix=None)
    with pytest.raises(AttributeError, match="nope"):
        h.nope.remote().result()


def test_result_timeout(url):
    @serve.deployment
    class Slow:
        async def __call__(self):
            await asyncio.sleep(2)

    h = serve.run(Slow.bind(), name="slow", route_prefix=None)
    with pytest.raises(GetTimeoutError):
        h.remote().result(timeout_s=0.1)
    with pytest.raises(TimeoutError):
        h.remote().result(timeout_s=0.1)


def test_function_deployment_and_replica_context(url):
    @serve.deployment
    def double(x):
        return 2 * x

    h = serve.run(double.bind(), name="fn", route_prefix=None)
    assert h.remote(21).result() == 42
    h2 = serve.run(Echo.bind(), name="ctx", route_prefix=None)
    app, dep, tag = h2.context.remote().result()
    assert (app, dep) == ("ctx", "Echo") and tag
    with pytest.raises(RayServeException):
        serve.get_replica_context()


def test_composition_passes_handles_and_responses(url):
    @serve.deployment
    class Adder:
        def __init__(self, n):
            self.n = n

        def __call__(self, x):
            return x + self.n

    @serve.deployment
    class Pipeline:
        def __init__(self, first, second):
            self.first, self.second = first, second

        async def __call__(self, x):
            # A response passed to another call is resolved first.
            r1 = self.first.remote(x)
            return await self.second.remote(r1)

        def sync_path(self, x):
            return self.second.remote(self.first.remote(x).result()).result()

    app = Pipeline.bind(Adder.bind(1), Adder.options(name="Adder2").bind(10))
    h = serve.run(app, name="pipe", route_prefix="/pipe")
    assert h.remote(5).result() == 16
    assert h.sync_path.remote(0).result() == 11
    deps = serve.status().applications["pipe"].deployments
    assert set(deps) == {"Pipeline", "Adder", "Adder2"}
    # Responses can be chained from the driver too.
    a = serve.get_deployment_handle("Adder", "pipe")
    assert a.remote(a.remote(1)).result() == 3


def test_same_deployment_bound_twice_gets_unique_names(url):
    @serve.deployment
    class Leaf:
        def __init__(self, v):
            self.v = v

        def __call__(self):
            return self.v

    @serve.deployment
    class Root:
        def __init__(self, a, b):
            self.a, self.b = a, b

        async def __call__(self):
            return [await self.a.remote(), await self.b.remote()]

    h = serve.run(Root.bind(Leaf.bind(1), Leaf.bind(2)), name="twice", route_prefix=None)
    assert h.remote().result() == [1, 2]
    assert len(serve.status().applications["twice"].deployments) == 3


class HandleWrapper:
    """A bound deployment held in an object of the user's own class (Ray's test_api)."""

    def __init__(self, inner):
        self._inner = inner

    def get(self):
        return self._inner


def test_a_bound_deployment_inside_an_object_of_any_class_becomes_a_handle(url):
    @serve.deployment
    def hello():
        return "hi"

    @serve.deployment
    class Driver:
        def __init__(self, wrapped, listed):
            self.wrapped, self.listed = wrapped, listed

        async def __call__(self):
            return [await self.wrapped.get().remote(), await self.listed[0].get().remote()]

    leaf = hello.bind()
    wrapper = HandleWrapper(leaf)
    h = serve.run(Driver.bind(wrapper, [HandleWrapper(leaf)]), name="wrapped", route_prefix=None)
    assert h.remote().result() == ["hi", "hi"]
    assert wrapper.get() is leaf  # the caller's object is left as it was
    assert set(serve.status().applications["wrapped"].deployments) == {"Driver", "hello"}


def test_a_positional_name_is_not_used_and_says_so(url):
    with pytest.warns(UserWarning, match=r"write @serve.deployment\(name='counter'\)"):
        @serve.deployment("counter", num_replicas=1)
        class Counter:
            def __call__(self):
                return "ok"

    assert Counter.name == "Counter"
    assert serve.run(Counter.bind(), name="positional", route_prefix=None).remote().result() == "ok"


@pytest.mark.parametrize(("prefix", "message"), [
    ("no_slash", r"Invalid route_prefix 'no_slash', must start with a forward slash \('/'\)\."),
    ("/a/", r"Invalid route_prefix '/a/', may not end with a trailing '/'\."),
    ("/{x}", r"Invalid route_prefix '/\{x\}', may not contain wildcards\."),
])
def test_a_bad_route_prefix_is_a_value_error_with_rays_message(url, prefix, message):
    @serve.deployment
    def f():
        return 1

    with pytest.raises(ValueError, match=message):
        serve.run(f.bind(), name="bad_prefix", route_prefix=prefix)


def test_a_deployment_left_out_of_a_redeploy_is_gone_when_run_returns(url):
    """As in Ray: a deployment being deleted is UPDATING (trigger DELETING), so its application
    is DEPLOYING until it is gone, and serve.run returns after that."""
    @serve.deployment
    class Model:
        def __init__(self):
            self.holding = 0

        async def __call__(self, hold_s=0.0):
            import asyncio

            self.holding += 1
            await asyncio.sleep(hold_s)
            return "model"

        def held(self):
            return self.holding

    @serve.deployment
    class Model1:
        def __call__(self):
            return "model1"

    old = serve.run(Model.bind(), name="swap", route_prefix="/swap")
    held = old.remote(hold_s=1.0)  # the old replica drains it first
    wait_for(lambda: old.held.remote().result() == 1, what="the held request running")
    h = serve.run(Model1.bind(), name="swap", route_prefix="/swap")
    deps = serve.status().applications["swap"].deployments
    assert {k: (v.status, v.replica_states) for k, v in deps.items()} == {"Model1": ("HEALTHY", {"RUNNING": 1})}
    assert held.result(timeout_s=30) == "model"
    assert h.remote().result() == "model1"


@serve.deployment(graceful_shutdown_timeout_s=5)
class HangingStart:
    async def __init__(self, folder):
        import asyncio

        self.folder = folder
        open(os.path.join(folder, "started"), "w").close()
        await asyncio.sleep(10_000)

    async def __del__(self):
        with open(os.path.join(self.folder, "deleted"), "a") as f:
            f.write("x")


def test_deleting_a_replica_still_in_its_async_constructor_runs_del_once(url, tmp_path):
    """As Ray's: the constructor is cancelled and `__del__` runs (it was killed before)."""
    serve._run(HangingStart.bind(str(tmp_path)), name="hanging", route_prefix=None, _blocking=False)
    wait_for(lambda: (tmp_path / "started").exists(), what="the constructor running")
    serve.delete("hanging")
    assert "hanging" not in serve.status().applications
    assert (tmp_path / "deleted").read_text() == "x"


def test_the_same_handle_comes_back_for_the_same_deployment(url):
    @serve.deployment
    def f():
        return "f"

    serve.run(f.bind(), name="cached", route_prefix=None)
    assert len({id(serve.get_app_handle("cached")) for _ in range(20)}) == 1  # as Ray's client caches them
    assert len({id(serve.get_deployment_handle("f", "cached")) for _ in range(20)}) == 1
    assert serve.get_app_handle("cached") is serve.get_deployment_handle("f", "cached")
    assert serve.get_app_handle("cached").remote().result() == "f"


def test_await_response_from_async_driver_code(url):
    h = serve.run(Echo.bind(), name="asyncdrv", route_prefix=None)

    async def main():
        results = await asyncio.gather(*[h.add.remote(i, b=1) for i in range(20)])
        return results

    assert asyncio.run(main()) == list(range(1, 21))


def test_get_handles_and_delete(url):
    serve.run(Echo.bind("x"), name="gh", route_prefix="/gh")
    assert serve.get_app_handle("gh").remote(1).result() == "x1"
    assert serve.get_deployment_handle("Echo", "gh").remote(2).result() == "x2"
    with pytest.raises(RayServeException):
        serve.get_app_handle("missing")
    serve.delete("gh")
    assert "gh" not in serve.status().applications
    assert httpx.post(f"{url}/gh", json=1).status_code == 404


@serve.deployment
class AsyncInit:
    async def __init__(self, x: int) -> None:  # allowed, as in Ray Serve
        await asyncio.sleep(0.01)
        self.x = x

    def __call__(self) -> int:
        return self.x


def test_private_run_returns_before_the_application_runs(url):
    """Ray's `serve._run(app, _blocking=False)`, used by Ray's tests and examples."""
    from tests.conftest import wait_for

    h = serve._run(AsyncInit.bind(7), name="privrun", route_prefix=None, _blocking=False)
    wait_for(lambda: serve.status().applications["privrun"].status == "RUNNING", what="privrun RUNNING")
    assert h.remote().result(timeout_s=10) == 7


def test_an_async_constructor_is_awaited(url):
    h = serve.run(AsyncInit.bind(5), name="asyncinit", route_prefix=None)
    assert h.remote().result(timeout_s=10) == 5


def test_get_deployment_handle_errors_are_rays(url):
    serve.run(Echo.bind("x"), name="ghe", route_prefix=None)
    with pytest.raises(KeyError, match="does not exist"):  # Ray raises KeyError
        serve.get_deployment_handle("Echo", "no-such-app")
    with pytest.raises(KeyError):
        serve.get_deployment_handle("NoSuch", "ghe")
    with pytest.raises(RayServeException, match="specify an application name"):  # outside a replica
        serve.get_deployment_handle("Echo")


def test_a_missing_method_is_a_ray_serve_exception_naming_the_methods(url):
    h = serve.run(Echo.bind(), name="nomethod", route_prefix=None)
    with pytest.raises(RayServeException) as info:
        h.options(method_name="nope").remote().result(timeout_s=10)
    assert isinstance(info.value, AttributeError)  # as before, for code that caught that
    assert "'nope' that does not exist" in str(info.value) and "'add'" in str(info.value)


@serve.deployment
class Streamer:
    async def count(self, n: int):
        for i in range(n):
            yield i

    async def take(self, gen) -> str:
        return "took"


@serve.deployment
class Context:
    def __init__(self, down) -> None:
        self.down = down

    async def __call__(self, request) -> dict:
        c = serve.context._get_serve_request_context()
        down = await self.down.info.remote()
        return {"up": [c.request_id, c.route, c.app_name], "down": down,
                "old": serve.context._serve_request_context.get().request_id}


@serve.deployment
class ContextDown:
    def info(self) -> list:
        c = serve.context._get_serve_request_context()
        return [c.request_id, c.route, c.app_name]


def test_serve_context_request_context_as_rays_examples_read_it(url):
    serve.run(Context.bind(ContextDown.bind()), name="ctxapp", route_prefix="/ctx")
    r = httpx.get(f"{url}/ctx", headers={"X-Request-ID": "abc-1"}, timeout=10)
    assert r.json() == {"up": ["abc-1", "/ctx", "ctxapp"], "down": ["abc-1", "/ctx", "ctxapp"], "old": "abc-1"}
    c = serve.context._get_serve_request_context()  # outside a request: empty
    assert (c.request_id, c.route, c.app_name) == ("", "", "")


@serve.deployment
class BlockingCaller:
    def __init__(self, streamer) -> None:
        self.streamer = streamer

    async def __call__(self, stream: bool) -> str:
        try:
            if stream:
                for _ in self.streamer.options(method_name="count", stream=True).remote(2):
                    pass
            else:
                self.streamer.take.remote(None).result()
        except RuntimeError as e:
            return str(e)
        return "no error"


def test_sync_waits_inside_a_deployments_event_loop_raise_rays_error(url):
    h = serve.run(BlockingCaller.bind(Streamer.bind()), name="blocking_in_dep", route_prefix=None)
    for stream, hint in ((False, "Use `await response` instead"), (True, "Use `async for`")):
        said = h.remote(stream).result(timeout_s=30)
        assert said.startswith("Sync methods should not be called from within an `asyncio` event loop."), said
        assert hint in said


def test_a_stream_passed_downstream_is_refused_with_rays_error(url):
    h = serve.run(Streamer.bind(), name="streamer", route_prefix=None)
    gen = h.options(method_name="count", stream=True).remote(3)
    with pytest.raises(TypeError, match="cannot be passed to downstream handle calls"):
        h.take.remote(gen).result(timeout_s=10)
    assert list(gen) == [0, 1, 2]


@serve.deployment(ray_actor_options={"num_cpus": 0})
class AppCaller:
    """Calls another application as Ray's multi-app guide does: from its constructor and from
    async methods (on the replica's own loop)."""

    def __init__(self, other: str) -> None:
        self.other = other
        self.ctor_handle = serve.get_app_handle(other)

    async def __call__(self, x: int) -> list:
        handle = serve.get_app_handle(self.other)
        status = serve.status().applications[self.other].status
        return [await handle.remote(x), await self.ctor_handle.remote(x + 1), status]


def test_get_app_handle_and_status_work_in_a_constructor_and_async_methods(url):
    serve.run(Echo.bind("o"), name="other", route_prefix=None)
    h = serve.run(AppCaller.bind("other"), name="caller", route_prefix=None)
    assert h.remote(1).result(timeout_s=30) == ["o1", "o2", "RUNNING"]


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Combiner:
    """Gets one response as an argument (its value) and others inside a list (to await)."""

    def __init__(self, first, second) -> None:
        self.first, self.second = first, second

    async def __call__(self, x: int) -> list:
        a = self.first.remote(x)
        return await self.second.gather.remote(a, [self.first.remote(x + 1), self.first.remote(x + 2)])


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Gatherer:
    async def gather(self, direct: str, refs: list) -> list:
        return [direct] + [await r for r in refs]


def test_responses_pass_between_replicas_by_value_and_by_reference(url):
    h = serve.run(Combiner.bind(Echo.bind("e"), Gatherer.bind()), name="refs", route_prefix=None)
    assert h.remote(1).result(timeout_s=30) == ["e1", "e2", "e3"]


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_constructor_retry_count=1)
class NeverStarts:
    def __init__(self) -> None:
        raise RuntimeError("no weights here")

    def __call__(self, *args) -> str:
        return "never"


def test_calls_to_a_deployment_that_failed_to_deploy_fail_at_once(url):
    """Ray Serve (2.41+): DeploymentUnavailableError from a handle, 503 over HTTP, not a wait."""
    with pytest.raises(RuntimeError, match="no weights here"):
        serve.run(NeverStarts.bind(), name="never", route_prefix="/never")
    assert serve.status().applications["never"].status == "DEPLOY_FAILED"
    t0 = time.monotonic()
    with pytest.raises(DeploymentUnavailableError, match="failed to deploy"):
        serve.get_app_handle("never").remote().result(timeout_s=30)
    r = httpx.get(f"{url}/never", timeout=30)
    assert r.status_code == 503 and "failed to deploy" in r.text and "unavailable" in r.text
    assert "RuntimeError: no weights here" in r.text  # the cause, not a dangling "Last error:"
    assert time.monotonic() - t0 < 5


def test_route_prefix_conflict_is_refused_and_first_app_keeps_serving(url):
    serve.run(Echo.bind("a"), name="a", route_prefix="/same")
    with pytest.raises(ConfigError, match="/same"):
        serve.run(Echo.bind("b"), name="b", route_prefix="/same")
    assert "b" not in serve.status().applications
    r = httpx.post(f"{url}/same", content=b"")
    assert r.status_code == 200
    assert serve.get_app_handle("a").remote(1).result() == "a1"


def test_multiple_replicas_spread_load(url):
    h = serve.run(Echo.options(num_replicas=3).bind(), name="three", route_prefix=None)
    assert serve.status().applications["three"].deployments["Echo"].replica_states == {"RUNNING": 3}
    pids = {h.pid.remote().result() for _ in range(60)}
    assert len(pids) == 3


@serve.deployment
class InitReturns:
    def __init__(self, x: int):
        self.x = x
        return True  # as Ray's test_constructor_failure does: Ray Serve ignores the value

    def __call__(self) -> int:
        return self.x


def test_a_value_returned_by_init_is_ignored(url):
    """Ray calls `__new__` then `__init__` as a method, so an `__init__` that returns a value
    deploys (calling the class raised TypeError: __init__() should return None)."""
    h = serve.run(InitReturns.bind(5), name="initret", route_prefix=None)
    assert h.remote().result() == 5


def test_converting_a_response_to_an_object_ref_says_why_not(url):
    """Ray's advanced `_to_object_ref*`: flotilla's replies do not go through Ray's object
    store, so it raises a RuntimeError saying what to do instead (it was an AttributeError)."""
    h = serve.run(InitReturns.bind(1), name="objref", route_prefix=None)
    r = h.remote()
    with pytest.raises(RuntimeError, match=r"not supported by flotilla.*Await the response"):
        r._to_object_ref_sync()
    with pytest.raises(RuntimeError, match="ObjectRefs"):
        asyncio.run(r._to_object_ref())
    assert r.result() == 1

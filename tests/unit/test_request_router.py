"""The custom request router API's pieces that need no cluster: the config (import, checks,
shipping by value), the mixins' rankings, the choice within a rank, replica ids."""

from __future__ import annotations

import cloudpickle
import pytest

from flotilla import serve
from flotilla.serve.config import RequestRouterConfig
from flotilla.serve.exceptions import ConfigError
from flotilla.serve.request_router import (
    LocalityMixin,
    MultiplexMixin,
    RequestRouter,
    RunningReplica,
    pick_in,
)
from flotilla.serve.schema import DeploymentID, ReplicaID

DEP = DeploymentID("D", "app")


class FirstRouter(RequestRouter):
    async def choose_replicas(self, candidate_replicas, pending_request=None):
        return [candidate_replicas[:1]]


class Ranked(MultiplexMixin, LocalityMixin, RequestRouter):
    async def choose_replicas(self, candidate_replicas, pending_request=None):
        return [candidate_replicas]


def rep(uid: str, routed: int = 0, limit: int = 2, models: set[str] | None = None) -> RunningReplica:
    r = RunningReplica(ReplicaID(uid, DEP), max_ongoing_requests=limit, multiplexed_model_ids=models)
    r._routed = routed
    return r


@pytest.mark.parametrize("path", ["", None, "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter"])
def test_the_default_and_rays_default_path_mean_the_built_in_router(path):
    cfg = RequestRouterConfig(request_router_class=path)
    assert not cfg.is_custom and cfg.serialized_class == b""


@pytest.mark.parametrize("given", [FirstRouter, f"{__name__}:FirstRouter", f"{__name__}.FirstRouter"])
def test_a_router_class_is_imported_checked_and_shipped_by_value(given):
    cfg = RequestRouterConfig(request_router_class=given, request_router_kwargs={"k": 1})
    assert cfg.is_custom
    dumped = cfg.model_dump(mode="json")
    assert dumped["request_router_class"] in (f"{__name__}:FirstRouter", f"{__name__}.FirstRouter")
    assert dumped["request_router_kwargs"] == {"k": 1}
    shipped = cloudpickle.loads(cfg.serialized_class)
    assert issubclass(shipped, RequestRouter) and shipped.__name__ == "FirstRouter"
    # by value: a process that cannot import this test module can still build it
    assert b"choose_replicas" in cfg.serialized_class


@pytest.mark.parametrize("opts, words", [
    ({"request_router_class": "no_such_module_xyz:Router"}, "could not import module 'no_such_module_xyz'"),
    ({"request_router_class": f"{__name__}:Missing"}, "has no attribute 'Missing'"),
    ({"request_router_class": dict}, "not a subclass of flotilla.serve.request_router.RequestRouter"),
    ({"request_router_class": 42}, "must be a class or an import path"),
    ({"request_router_class": FirstRouter, "request_router_kwargs": {"f": object()}}, "not JSON-serializable"),
])
def test_bad_router_configs_are_refused_at_declaration_naming_the_option(opts, words):
    with pytest.raises(ConfigError, match="request_router_config") as e:
        serve.deployment(request_router_config=opts)(lambda: None)
    assert words in str(e.value)


def test_multiplex_ranks_holders_then_the_emptiest_then_the_rest():
    a, b, c, d = rep("a", models={"m1"}), rep("b", models={"m2", "m3"}), rep("c", models=set()), rep("d", models={"m2"})
    ranks = Ranked(DEP).rank_replicas_via_multiplex([a, b, c, d], "m1")
    assert ranks == [[a], [c], [b, d]]
    assert Ranked(DEP).rank_replicas_via_multiplex([b, d], "m2") == [[b, d], [], []]


def test_locality_puts_every_local_replica_first():
    a, b = rep("a"), rep("b")
    assert Ranked(DEP).rank_replicas_via_locality([a, b]) == [[a, b], [], []]


def test_available_replicas_are_those_below_their_limit():
    router = Ranked(DEP)
    full, free = rep("full", routed=2), rep("free", routed=1)
    router.update_replicas([full, free])
    assert router.select_available_replicas() == [free]
    assert router.select_available_replicas([full]) == []
    assert set(router.curr_replicas) == {full.replica_id, free.replica_id}
    assert router.app_name == "app"


def test_the_least_loaded_replica_with_room_is_taken_from_a_rank():
    assert pick_in([rep("a", 2), rep("b", 1), rep("c", 0, limit=0)]).replica_id.unique_id == "b"
    assert pick_in([rep("a", 2), rep("b", 2)]) is None
    assert pick_in([]) is None


def test_replica_ids_print_and_parse_as_rays():
    rid = ReplicaID("abc", DEP)
    assert str(rid) == repr(rid) == "Replica(id='abc', deployment='D', app='app')"
    assert str(DEP) == repr(DEP) == "Deployment(name='D', app='app')"
    assert rid.to_full_id_str() == "SERVE_REPLICA::app#D#abc"
    assert ReplicaID.from_full_id_str(rid.to_full_id_str()) == rid
    assert ReplicaID.from_full_id_str("SERVE_REPLICA::D#abc") == ReplicaID("abc", DeploymentID("D", ""))
    with pytest.raises(ValueError, match="full replica id"):
        ReplicaID.from_full_id_str("abc")

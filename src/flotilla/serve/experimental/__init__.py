"""Ready-made request routers (Ray Serve 2.60's `ray.serve.experimental`): name one in a
deployment's `request_router_config`.

- `round_robin_router.RoundRobinRouter`: each request starts at the next replica in turn.
- `consistent_hash_router.ConsistentHashRouter`: a request's session id (the `x-session-id`
  header, `handle.options(session_id=...)`) picks its replica on a hash ring, so a session
  stays on one replica while the replica set does not change.

Ray's capacity-queue router (a queue actor per deployment) has no flotilla twin.
"""

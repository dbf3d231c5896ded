"""Ray Serve 2.60's capacity-queue router has no flotilla twin: importing it says so."""

raise ImportError(
    "flotilla has no CapacityQueueRouter (Ray's needs a capacity-queue actor per deployment). flotilla's "
    "built-in router already admits by each replica's max_ongoing_requests and queues in the caller "
    "(max_queued_requests); for a custom policy, subclass flotilla.serve.request_router.RequestRouter.")

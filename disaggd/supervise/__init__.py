"""HOW processes live: spawn, watch, restart and stop the instances (processes, never requests).

* `states` — supervisord's process states and their legal edges;
* `policy` — the pure restart decision (how a life ended → BACKOFF, FATAL or STOPPED);
* `osapi` — the OS seam (spawn in a new session, signal and reap groups, ports, subreaper);
* `child` — one child process group: spawn, output pump, SIGTERM → grace → SIGKILL;
* `life` — one instance's task, from launch to STOPPED or FATAL (spawned or remote);
* `instance` — one instance's record; `Instance.change` is its only writer;
* `events` — `InstanceStatus` snapshots and the one `InstanceEvent` stream;
* `health` — the ``GET /health`` probe;
* `guardian` (a separate program) and `guardian_client` — kill the groups if the daemon dies;
* `supervisor` — the collection: start, add, restart, remove, shutdown, wait_ready.
"""

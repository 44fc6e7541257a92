"""The composition root: one event loop, one task group, signals, reloads and the control socket.

* `core` — `Daemon`: builds the rooms, starts them in order, drains and stops them;
* `signals` — signal handlers that only set events;
* `readiness` — instance events → routing, metrics, STATUS= and READY=1;
* `rollout` — a reload plan carried out (drain, rolling restart, add, remove);
* `dispatch` — one function per control verb;
* `control` — the control socket's protocol, server and client;
* `status` — what `disaggd status` and systemd show.
"""

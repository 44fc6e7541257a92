"""HOW requests flow: upstreams, never processes.

* `app` — the ASGI app and its views (/health, /livez, /readyz, /metrics, /v1/models),
  the listening socket (`bind_listener`), Hypercorn;
* `pipeline` — the request path: gate → decide → prefill leg → decode leg → reply → account;
* `request` — the client's request: headers, body, checks, prompt size, batches;
* `admission` — per-role in-flight limits and the bounded wait queue (429 / 503);
* `handoff` — how each connector kind shapes the two legs (bodies, request ids);
* `legs` — the prefill leg (with retries) and the decode leg;
* `failures` — the one table of upstream failures: metric kind, log tag, client status;
* `reply` / `sse` — the reply to the client, streams passed through, streams synthesized;
* `endings` — was a stream or answer finished by the engine, or cut;
* `errors` — errors in the OpenAI shape;
* `kvcheck` — did the decode load the prompt's KV;
* `record` — one request's record, its metrics and its one log line;
* `settings` — what the proxy reads from the topology; drain admission;
* `clients` — pooled HTTP clients toward the instances;
* `upstream` — one instance as the proxy sees it, and a request's hold on it;
* `breaker` — one breaker per instance (pure state machine);
* `passive` — passive health: what the legs report, stalls, and when a breaker trips;
* `prefix` — cache-aware choice: the prompt-prefix index, balance rule, session affinity;
* `router` — which instance gets the next request.
"""

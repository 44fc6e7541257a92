"""HOW requests flow: upstreams, never processes.

* `app` — the ASGI app and its views, the listening socket (`bind_listener`), Hypercorn;
* `pipeline` — the request path: gate → decide → prefill leg → decode leg → reply → account;
* `request` — the client's request: headers, body, checks, prompt size, batches;
* `handoff` — how each connector kind shapes the two legs (bodies, request ids);
* `legs` — the prefill leg (with retries) and the decode leg;
* `failures` — the one table of upstream failures: metric kind, log tag, client status;
* `reply` / `sse` — the reply to the client, streams passed through, streams synthesized;
* `errors` — errors in the OpenAI shape;
* `kvcheck` — did the decode load the prompt's KV;
* `record` — one request's record, its metrics and its one log line;
* `settings` — what the proxy reads from the topology; drain admission;
* `upstreams` — pooled HTTP clients toward the instances;
* `router` — which instance gets the next request.
"""

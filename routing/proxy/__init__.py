"""The routing proxy: forwards an inference request to the variant its unit is assigned.

Mounted on the edge at ``/proxy/`` (``build_edge(mounts={"/proxy/": ProxyApp})``), it serves
``/proxy/{experiment}/{path}``: identifies the unit, assigns it with the snapshot's
``ExperimentRoute.decide()``, records the exposure, forwards the method, path, query, headers
and body to the chosen variant's upstream, and streams the answer back with
``X-Rampart-Experiment`` and ``X-Rampart-Variant`` headers. Everything happens in one hop, so
exposures are exact and latency is measured the same way for every arm.

Request handling, in order
    1. API key (``X-Rampart-Key: rk_...``, or ``Authorization: Bearer rk_...``, which is then
       not forwarded) with the ``decide`` scope, unless EDGE_REQUIRE_KEY is false: 401/403.
    2. An experiment the snapshot lacks: the config version is confirmed
       (``routing.edge.context.resolve_route``) and an experiment created meanwhile is served; else
       404 ``experiment_not_found``, or 503 ``experiment_not_on_edge`` with ``Retry-After``
       while the version cannot be confirmed. Body over PROXY_MAX_BODY_BYTES: 413.
    3. Unit id from the experiment's ``unit_source``/``unit_attribute``: a header (default
       ``X-Rampart-Unit``), a cookie, a top-level field of a JSON body, or a query parameter.
       A request without one is served control (reason ``no_unit``) and counted for control;
       it is not an error. A unit id that is not UTF-8 is: 400 ``invalid_encoding`` from the
       proxy itself, nothing forwarded (the unit cannot be determined, and replacing the bytes
       would merge distinct ids).

    The proxy's own errors are problem+json (``routing.edge.problems``, docs/errors.md); the
    model's answers pass through unchanged.
    4. Prediction cache (experiments with ``cache_ttl_s`` > 0): a hit is answered at once with
       ``X-Rampart-Cache: hit``, counted in ``cache_hits`` and kept out of latency statistics.
    5. Shadow variants get a mirrored copy in the background (see below).
    6. The request goes to the assigned arm's upstream over the pooled connections of one
       aiohttp session (``routing.proxy.upstream``: one write, aiohttp's C parser for the answer).

Failures and fallback
    An attempt fails on a 5xx answer, a timeout (PROXY_CONNECT_TIMEOUT_S to connect;
    PROXY_READ_TIMEOUT_S for the whole answer when it is read whole, between chunks when it is
    streamed) or a connection failure. When a non-control arm fails
    and the experiment has ``fallback_to_control``, the request is sent once to control, so the
    user still gets an answer; the failure counts against the arm (``error_count``, with its
    latency) and the fallback is counted (``fallback_count``). The response then carries
    ``X-Rampart-Served-By: <control key>``; ``X-Rampart-Variant`` stays the assigned arm, which
    is what exposures and ``/v1/decide`` say. Control's answer to a fallback is not added to
    control's statistics: those describe control's own units, and mixing in the other arm's
    traffic would make the two samples overlap.

    Every upstream has a circuit breaker (``routing.proxy.breaker``): PROXY_BREAKER_FAILURES
    consecutive failures open it, and one probe goes through every PROXY_BREAKER_COOLDOWN_S.
    While a non-control arm's breaker is open, its requests go straight to control and count
    as errors and fallbacks of that arm, with no latency (no call was made). The choice is
    deliberate: the arm is unhealthy, and counting those requests as errors is what lets the
    guardrail see it and roll the canary back, where skipping them would hide the outage from
    the analysis. Without ``fallback_to_control`` a failed arm's answer is passed on: its own
    5xx, or a problem+json 502 (connection failure, open breaker) or 504 (timeout).

    When control itself cannot answer, the client gets a problem+json error: 502
    ``upstream_unavailable`` (connection failure or open breaker) or 504 ``upstream_timeout``.
    A 5xx from control is the model's own answer and is passed through unchanged.

Shadows
    A variant with ``is_shadow`` receives a copy of every request forwarded to an upstream
    (cache hits are not), with ``X-Rampart-Shadow: 1``, from a background task: the user never
    waits for it or sees its answer. At most PROXY_SHADOW_CONCURRENCY copies are in flight per
    process; past that, and while the shadow's breaker is open, copies are dropped and counted
    (``rampart_proxy_shadow_dropped_total``). The shadow's latency and errors go to
    ``is_shadow`` observation rows. When control answered the same request (itself or as a
    fallback) with a complete body, the pair is compared: with ``shadow_compare_field`` set
    and both bodies JSON objects, the field's values are compared (and for numbers the
    absolute difference is summed); otherwise the bodies are compared byte for byte.

Measurement
    Latency is the time from sending the request upstream to receiving the last byte of the
    answer, in ms, for every attempt (failed ones included); see
    ``routing.observe.observations`` for exactly what each statistic counts.
    Streamed answers are also measured as they pass (``routing.proxy.streaming``): time to
    the first byte, chunks, and for server-sent events the time to the first event with
    content (TTFT); answers of completion endpoints (``/completions``, ``/responses``) give
    their tokens (``usage``, or counted content events as an approximation) and, with the
    variant's prices, their cost (``routing.observe.llm_stats``).

Limits and resources
    One ``aiohttp.ClientSession`` per process, created at start-up, with a TCP connector
    limited to PROXY_POOL_LIMIT connections (PROXY_POOL_LIMIT_PER_HOST per upstream) that are
    kept alive between requests; requests use its connections directly (``routing.proxy.upstream``
    says why and how). A client that disconnects cancels the upstream call: the
    connection is closed, never returned to the pool half-read. The proxy listens for
    disconnects only once a request has waited DISCONNECT_WATCH_AFTER_S (up to twice that) for
    its upstream, which spares fast answers a listener task: a client that leaves earlier is
    noticed then, or not at all if its answer arrives first (the request then counts as an
    ordinary one and the answer goes nowhere). Answers with a Content-Length up to 1 MiB are
    read whole and sent in one message (the common case for inference); others are streamed
    chunk by chunk. Hop-by-hop headers are removed both ways (and the model's Date and
    Server, which the edge sets), and ``X-Forwarded-For`` gets the client's address appended.
"""

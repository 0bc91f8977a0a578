"""Call policy: who is calling and how much they may do.

`identity` (the `Identity` every transport works with), `tokens` (API keys and
JWTs), `api_keys` (the key store), `ratelimit` (token buckets in Redis),
`throttle` (failed authentications per address and tenant, in process),
`pacing` (session opens in flight and waiting, in process: a burst is paced,
not failed) and `gate` — the one `CallGate` (throttle → authenticate → scope → tenant call
limit) that the gRPC interceptor and the WebSocket adapter both call.
"""

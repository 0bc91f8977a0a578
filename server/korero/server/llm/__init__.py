"""The LLM upstream: any OpenAI-compatible endpoint through the `openai` package.

`provider` (streaming requests, SSE parsing, token estimates), `transport`
(the `openai` client's HTTP over aiohttp, with its one aiohttp → httpx2 error
table) and `errors` (the one table mapping `openai` / HTTP exceptions to
`UpstreamError`).
"""

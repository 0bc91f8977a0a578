"""The LLM upstream: any OpenAI-compatible endpoint through the `openai` package.

`provider` (streaming requests, SSE parsing, token estimates) and `errors`
(the one table mapping `openai` / HTTP exceptions to `UpstreamError`).
"""

"""What goes into the prompt, and what can skip the model.

`router` (intent), `knowledge` + `retrieval` (the per-tenant knowledge base
and BM25), `citations` (the one citation label format and its parser),
`assembly` (the budgeted prompt) and `cache` (the tenant-scoped response
cache).
"""

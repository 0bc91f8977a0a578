"""What happened, in PostgreSQL: the facts `korero report` reads.

`recorder` (turn facts and handoff records, written in batches off the chat
path) and `queries` (the report: containment, handoffs by trigger, agent
wait, time to first token, cache savings, top intents).
"""

"""Front processes: `http.workers` > 1 serves HTTP from that many processes.

One process holds the GIL, and at load a webhook's HTTP, signature and logging cost more
than its commit. With `http.workers = N` the main process (journal, sender, Quart app)
serves no HTTP itself and starts N fronts that accept on one listener, check webhooks
themselves, and hand checked events to the main process's journal over a socketpair
(`link.py`); a front answers 200 only on the main process's ack, after the commit. Other
requests are relayed whole to the main process's app, so `/v1` and `/metrics` have one
source of truth. Linux only (`pidfd_open`, `PR_SET_PDEATHSIG`).
"""

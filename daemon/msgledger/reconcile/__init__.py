"""The daily reconciler's parts: reading a listed row (`rows`), comparing a day with the
store (`compare`), and one run of one day (`run`). The actor is `msgledger.reconciler`."""

"""A Jepsen-style total-queue check of nsqjobs with the job ledger: ``make chaos``, or
``python -m bench.chaos``; a short version runs in ``make test`` (tests/test_chaos.py).

Jobs with chosen ids go through the gateway at a steady rate while processes are SIGKILLed and
SIGSTOPped on a schedule; every answer is written down. Then three witnesses are read, each
independent of the others: the ledger's rows (read behind the gateway's back), a consumer of
``results`` and ``dead_letters`` on its own durable channel, and a file the task appends to on
every execution. The checker (``bench.chaos.check``) turns them into: accepted, lost,
duplicate executions, duplicate recorded outcomes, re-drives.

Modules, in the order a run uses them: ``scenarios`` (what to run, as data), ``cluster`` (the
processes and the faults), ``client`` (the submitting client), ``observe`` (the witnesses),
``ledger`` (the store under test), ``run`` (one scenario end to end), ``check`` (the verdict),
``selftest`` (planted defects the checker must find), ``report`` (chaos.md, chaos.json).
"""

"""The core: build and job state machines, the manager, scheduler, ledger and store."""

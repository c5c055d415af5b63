"""The reconciler's set-up and writes in process, on stand-ins: the state topic it creates or
checks (`ensure_state_topic`, `partition_counts`), the changelog it loads on a partition's
take-over (`load_changelog`), the callback it builds from Luma's answer
(`_callback_from_api`), and what it writes, applies and dead-letters."""

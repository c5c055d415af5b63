"""The reconciler's running loop in process, on the stand-ins of `test_reconciler_decisions.py`:
how `run` paces its passes and reads, when a partition counts as read to its end
(`_caught_up`), what a pass does with each tracked generation (`_act`, `_candidate`,
`_look_up`, `_wrote`), discovery (`_discover`), stopping and the gauges."""

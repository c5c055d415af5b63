"""Completing lifecycles from Luma's API when callbacks were lost: `luma-kafka-bridge reconcile`.

Owns the reconciler (`reconciler.py`: the consumer group on the lifecycle topic, its
changelog, lookups and discovery), its client of Luma's API (`luma.py`), its
bookkeeping (`tracking.py`) and its process (`service.py`: probes, metrics, signals).
May import `contract`, `delivery`, `ops` and `settings`; nothing imports it but the
command line.
"""

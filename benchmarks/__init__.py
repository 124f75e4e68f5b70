"""polyqueue benchmarks: ``python -m benchmarks`` (or ``nox -s bench``).

Measures enqueue rate (one job per transaction, and ``enqueue_many``), end-to-end
no-op throughput of one worker process, and pickup latency at a steady rate, on a
fresh database it creates and drops. See docs/benchmarks.md.
"""

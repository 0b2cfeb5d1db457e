"""kproxy benchmarks (run with ``make bench``; results go to ``bench/out/``).

Each module here is a script with a ``main(argv)``; ``scripts/bench.sh`` runs
them all. They report ratios measured in one run on one machine (DESIGN.md §4)
and never assert on time.
"""

"""Benchmarks behind `ftray bench`: ftray against baselines measured in the same run, on the same machine.

    ftray bench train-throughput --steps 12 --out bench_results   # see ftray/bench/throughput.py
"""

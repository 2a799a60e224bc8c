"""Benchmarks of llmkernels against the PyTorch baselines, and GPT-2 training steps.

    python -m benchmarks                      # every suite (GPU), results in a new benchmarks/results/<date>-<time>-<device>/
    python -m benchmarks --headline           # the headline cases first measured by a GPU session
    python -m benchmarks attention --quick    # one suite, few shapes, few reps
    python -m benchmarks --device cpu --quick # the small CPU comparison (also what a machine without a GPU runs)
    pytest benchmarks/ --benchmark-only       # pytest-benchmark cases of the same ops

Modules: measure (timers, ceilings, environment), kernels (ops, shapes, providers, FLOP and
byte counts), e2e (training steps), report (tables, JSON, plots, anchors), cli.
"""

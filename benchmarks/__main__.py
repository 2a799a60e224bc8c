"""python -m benchmarks: see benchmarks/cli.py (or --help)."""
from .cli import main

raise SystemExit(main())

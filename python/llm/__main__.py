"""python -m llm: the same as python -m llm.train."""

from llm.train import main

try:
    main()
except (ValueError, FileNotFoundError) as error:  # bad input: the message, no traceback
    raise SystemExit(f"error: {error}") from None

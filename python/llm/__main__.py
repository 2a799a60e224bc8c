"""python -m llm: the same as llm-train."""

from llm.train import main

main()

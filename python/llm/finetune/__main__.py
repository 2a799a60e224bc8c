from llm.finetune.cli import main

main()

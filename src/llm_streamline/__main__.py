from llm_streamline.cli import main

main()

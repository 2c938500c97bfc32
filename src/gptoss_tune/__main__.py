from gptoss_tune.cli import main

main()

from scribe_cli.cli import main

main()

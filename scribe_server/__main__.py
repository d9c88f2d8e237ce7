from scribe_server.cli import main

main()

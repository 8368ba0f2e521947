from miocli.cli.app import main

main()

from miocli.cli import main

main()

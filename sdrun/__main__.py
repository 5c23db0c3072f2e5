from sdrun.cli import main

main()

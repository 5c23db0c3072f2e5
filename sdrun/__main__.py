from sdrun.entry import main

main()

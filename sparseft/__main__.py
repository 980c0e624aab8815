from sparseft.cli import main

main()

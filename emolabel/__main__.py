from emolabel.cli.main import main

main()

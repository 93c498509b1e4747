from services.paramserver.main import main

main()

from konstruct.providers.simulator.server import main

if __name__ == "__main__":
    main()

from shardd.cli import main

if __name__ == "__main__":  # spawned children import this module as __mp_main__
    main()

from shardd.cli import main

if __name__ == "__main__":  # `python -m shardd`; an imported module (no __main__) runs nothing
    main()

"""`python -m fgvc` (also what torchrun launches)."""

from fgvc.cli import main

if __name__ == "__main__":
    main()

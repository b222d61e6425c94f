"""`python -m recloop.cli ...` (and `torchrun -m recloop.cli train ...`): the same as `recloop`."""

from recloop.cli import main

if __name__ == "__main__":
    main()

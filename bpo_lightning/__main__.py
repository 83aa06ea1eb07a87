"""``python -m bpo_lightning`` is the ``bpo`` command."""

from bpo_lightning.cli import main

if __name__ == "__main__":
    main()

"""`python -m diffalign` is the CLI, so `accelerate launch -m diffalign train cfg.yaml` works."""

from diffalign.cli import main

if __name__ == "__main__":
    main()

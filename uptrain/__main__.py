"""`python -m gqa_toolkit.uptrain RECIPE.yaml` (and `accelerate launch -m gqa_toolkit.uptrain RECIPE.yaml`)."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="gqa-uptrain")

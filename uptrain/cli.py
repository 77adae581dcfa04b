"""`gqa-uptrain RECIPE.yaml [key=value ...]`: uptrain a converted checkpoint as a recipe says.

The same command runs under `accelerate launch -m gqa_toolkit.uptrain RECIPE.yaml` on many processes.
"""

from __future__ import annotations

import click

from gqa_toolkit.convert.command import HELP, Command, print_warnings, user_errors


@click.command(cls=Command, context_settings=HELP)
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--print-recipe", is_flag=True, help="Print the resolved recipe and exit without training.")
@user_errors("gqa-uptrain", "rerun the same command to resume from the last checkpoint")
def main(recipe: str, overrides: tuple[str, ...], print_recipe: bool) -> None:
    """Uptrain the converted checkpoint named in RECIPE (YAML).

    OVERRIDES are dotted key=value pairs applied on top of the recipe, e.g. train.lr=3e-4 output.dir=runs/x.
    Rerunning the same command resumes from the run's last checkpoint.
    """
    from .recipe import load_recipe

    print_warnings("gqa-uptrain", "gqa_toolkit.uptrain")
    loaded = load_recipe(recipe, overrides)
    if print_recipe:
        click.echo(loaded.resolved().to_yaml(), nl=False)
        return
    from .loop import train  # imports torch and transformers: only when there is training to do

    out = train(loaded)
    from accelerate import PartialState

    if PartialState().is_main_process:
        click.echo(f"uptrained model written to {out}", err=True)

"""`gqa-uptrain RECIPE.yaml [key=value ...]`: uptrain a converted checkpoint as a recipe says.

The same command runs under `accelerate launch -m gqa_toolkit.uptrain RECIPE.yaml` on many processes.
"""

from __future__ import annotations

import click

from gqa_toolkit.command import HELP, Command, print_warnings, user_errors


@click.command(cls=Command, context_settings=HELP)
@click.argument("recipe", required=False)
@click.argument("overrides", nargs=-1)
@click.option("--print-recipe", is_flag=True, help="Print the resolved recipe and exit without training.")
@click.option("--list", "list_recipes", is_flag=True, help="List the recipes shipped with the toolkit and exit.")
@click.option("--copy", "copy_name", metavar="NAME", default=None,
              help="Copy the shipped recipe NAME to RECIPE (default: ./NAME) to edit, and exit.")
@user_errors("gqa-uptrain", "rerun the same command to go on (from the last checkpoint, if one was saved)",
             out_of_memory="lower train.micro_batch_size (gradient accumulation keeps train.batch_size) or "
                           "data.block_size, then rerun the same command to go on")
def main(recipe: str | None, overrides: tuple[str, ...], print_recipe: bool, list_recipes: bool,
         copy_name: str | None) -> None:
    """Uptrain the converted checkpoint named in RECIPE (YAML).

    OVERRIDES are dotted key=value pairs applied on top of the recipe, e.g. train.lr=3e-4 output.dir=runs/x.
    Rerunning the same command resumes from the run's last checkpoint. RECIPE may name a shipped recipe
    (gqa-uptrain --list) when no such file exists.
    """
    from .errors import UptrainError
    from .recipe import load_recipe
    from .shipped_recipes import copy_recipe, resolve_recipe, shipped

    print_warnings("gqa-uptrain", "gqa_toolkit.uptrain")
    if list_recipes:
        width = max(map(len, shipped()))
        click.echo("\n".join(f"{name:<{width}}  {about}" for name, about in shipped().items()))
        return
    if copy_name is not None:
        click.echo(f"copied to {copy_recipe(copy_name, recipe)}")
        return
    if recipe is None:
        raise UptrainError("give a RECIPE (a YAML file, or a shipped recipe's name: gqa-uptrain --list)")
    loaded = load_recipe(resolve_recipe(recipe), overrides)
    if print_recipe:
        click.echo(loaded.resolved().to_yaml(), nl=False)
        return
    from . import train  # imports torch and transformers: only when there is training to do

    out = train(loaded)
    from accelerate import PartialState

    if PartialState().is_main_process:
        click.echo(f"uptrained model written to {out}", err=True)

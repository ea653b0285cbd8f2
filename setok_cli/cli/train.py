"""`setok train RECIPE.yaml [--set key=value ...] [--resume]`."""
from __future__ import annotations

import click


@click.command("train")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. --set optim.lr=3e-4 --set train.max_steps=100.")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in output_dir.")
@click.option("--output-dir", default=None, help="Shortcut for --set output_dir=DIR.")
@click.option("--print-recipe", is_flag=True, help="Print the resolved recipe and exit.")
@click.option("--dry-run", is_flag=True,
              help="Build the model on the meta device (no weights, no memory) and print its parameter counts.")
def train(recipe, overrides, resume, output_dir, print_recipe, dry_run):
    """Train a stage from a YAML recipe (single process, or under `accelerate launch` / `torchrun`)."""
    import yaml

    from ..train.recipe import load_recipe, recipe_to_dict
    ov = list(overrides) + ([f"output_dir={output_dir}"] if output_dir else [])
    r = load_recipe(recipe, ov)
    if print_recipe:
        click.echo(yaml.safe_dump(recipe_to_dict(r), sort_keys=False, default_flow_style=None), nl=False)
        return
    if dry_run:
        from rich.console import Console
        from rich.table import Table

        from ..train.trainer import meta_model, select_trainable
        model, parameter_report = meta_model(r)
        select_trainable(model, r.train.trainable, r.train.frozen)
        table = Table(title=f"{recipe} on the meta device")
        table.add_column("part")
        table.add_column("parameters", justify="right")
        table.add_column("trainable", justify="right")
        for name, v in parameter_report(model).items():
            table.add_row(name, f"{v['total']:,}", f"{v['trainable']:,}")
        Console().print(table)
        t = getattr(r.model, "text_first", None) if r.stage == "stage3" else None
        if t is not None:
            click.echo(f"before stage III, text first: {t.steps} steps of {t.batch_size} rows of {t.path} at lr "
                       f"{t.lr:g}, through model.lora's adapters, merged into the LM (trainable above: stage III's)")
        return
    from ..train.trainer import run
    run(r, resume=resume)

"""The `stemma` Typer application and its sub-command groups (the verb modules add their commands to them)."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Build, track, fit and serve a hierarchy of language models.")
data_app = typer.Typer(no_args_is_help=True, help="Corpora and datasets.")
update_app = typer.Typer(no_args_is_help=True, help="Updates from devices and children: sign, submit, aggregate.")
app.add_typer(data_app, name="data")
app.add_typer(update_app, name="update")
apps_app = typer.Typer(no_args_is_help=True, help="Apps: prompt templates bound to a node, served as model app:NAME.")
app.add_typer(apps_app, name="app")
deploy_app = typer.Typer(no_args_is_help=True, help="Lay a base and its LoRA children out for another serving engine.")
app.add_typer(deploy_app, name="deploy")

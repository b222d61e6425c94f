"""`recloop models ...`: list, inspect, promote and roll back the registry's versions."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from recloop.cli.common import JsonOption, RegistryOption, stdout

models_app = typer.Typer(help="List, inspect, promote and roll back model versions.")


@models_app.command("list")
def models_list(registry: RegistryOption, json_output: JsonOption = False) -> None:
    """All versions, oldest first, with their key metrics; broken ones are marked so."""
    from recloop.cli.versions_table import format_versions_table
    from recloop.registry import Registry

    infos = Registry(registry, create=False).list()
    if json_output:
        print(json.dumps([info.to_json() for info in infos], indent=2))
        return
    stdout.print(format_versions_table(infos))


@models_app.command("show")
def models_show(
    registry: RegistryOption,
    version: Annotated[str, typer.Argument(help="Version id, latest or production.")] = "latest",
) -> None:
    """A version's manifest (checksums verified)."""
    from recloop.registry import Registry

    store = Registry(registry, create=False)
    resolved = store.resolve(version)
    store.verify(resolved)
    print(json.dumps(store.manifest(resolved).to_json(), indent=2))


@models_app.command("promote")
def models_promote(
    registry: RegistryOption,
    version: Annotated[str, typer.Argument(help="Version id or latest.")],
) -> None:
    """Make a version the production one (serving follows it)."""
    from recloop.registry import Registry

    stdout.print(f"production is now {Registry(registry, create=False).promote(version)}")


@models_app.command("rollback")
def models_rollback(registry: RegistryOption) -> None:
    """Return production to the previously promoted version."""
    from recloop.registry import Registry

    stdout.print(f"production rolled back to {Registry(registry, create=False).rollback()}")


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")

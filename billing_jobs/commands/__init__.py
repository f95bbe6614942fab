"""Commands beyond the core ones, each module exporting `COMMANDS`."""

from __future__ import annotations

import click

from billing_jobs.commands import credits, explain, ops, pages, reconcile, rejects, schedule


def register_commands(group: click.Group) -> None:
    for module in (ops, explain, schedule, credits, rejects, reconcile, pages):
        for command in module.COMMANDS:
            group.add_command(command)

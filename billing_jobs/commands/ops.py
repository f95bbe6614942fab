"""Placeholder until the commands land."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []

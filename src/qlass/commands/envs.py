"""``qlass envs``: the known environments with their splits and sizes."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("envs")
    def envs() -> None:
        """List every registered environment, its splits and their sizes (or what to install)."""
        from ..envs.base import env_close, env_splits, make_env, registered_envs
        from ..errors import QlassError

        for name in registered_envs():
            try:
                env = make_env(name)
            except QlassError as exc:
                typer.echo(f"{name}: unavailable — {exc}")
                continue
            try:
                sizes = ", ".join(f"{split} {n}" for split, n in env_splits(env).items())
            finally:
                env_close(env)
            typer.echo(f"{name}: {sizes}")

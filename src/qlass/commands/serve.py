"""``qlass serve ENV``: an environment as an HTTP server (AgentGym's protocol plus task listings)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_cmd(
        env: str = typer.Argument(..., help="Environment name (sciworld, alfworld, webshop) or package.module:Class."),
        host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback by default; the server has no "
                                                   "authentication)."),
        port: int = typer.Option(8000, min=0, max=65535, help="TCP port."),
        env_arg: list[str] = typer.Option([], help="Environment constructor option key=value (repeatable)."),
        max_instances: int = typer.Option(64, min=1, help="At most this many environment instances open at once."),
        max_request_bytes: int = typer.Option(1 << 20, min=1, help="Refuse a request body over this many bytes (413)."),
        idle_timeout: float = typer.Option(1800.0, min=0, help="Close an instance unused for this many seconds (its "
                                           "client is taken for dead; 0: never). GET /instances lists them."),
        limit_concurrency: int = typer.Option(256, min=1, help="Answer 503 beyond this many open connections or "
                                              "requests (each client keeps one connection)."),
        docs: bool = typer.Option(False, "--docs", help="Also serve the interactive API pages (/docs, /redoc, "
                                                        "/openapi.json)."),
        protocol: str = typer.Option("qlass", help="qlass: qlass's answers and task listings (for HttpEnv); agentgym: "
                                     "answer exactly as AgentGym's server for ENV (sciworld, alfworld, webshop), with "
                                     "its task indices, game variant and step limit."),
        agentgym_games: str = typer.Option(None, help="alfworld with --protocol agentgym: the folder with AgentGym's "
                                           "mappings_train.json and mappings_test.json (agentenv-alfworld/configs)."),
    ) -> None:
        """Serve ENV over HTTP: /create, /reset, /step, /observation, /close (+ /splits, /tasks, /prompt, /expert)."""
        from ..config import parse_kv
        from ..serve import serve

        serve(env, host=host, port=port, env_args=parse_kv(env_arg, "--env-arg"), max_instances=max_instances,
              docs=docs, max_request_bytes=max_request_bytes, protocol=protocol, agentgym_games=agentgym_games,
              idle_timeout=idle_timeout, limit_concurrency=limit_concurrency)

"""CLI verbs, one module per area; each defines `register(app: typer.Typer)`."""

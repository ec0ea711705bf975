"""The operators' web console, served by the REST app at ``/ui`` (docs/console.md): static ES
modules and CSS (no build step), the same origin and operator tokens as /api/v1."""

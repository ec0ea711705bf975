from edgeloop.cli import app

app()

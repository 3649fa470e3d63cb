from dzad.cli import app

app()

"""The one typer application; command modules decorate it (`@app.command()`)."""

import typer

app = typer.Typer(
    name="lusai",
    help="Lung-ultrasound inference service: DICOM SCP, workers, REST API and tools.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

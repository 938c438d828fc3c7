"""The ``onnxq`` command line: the only package that prints or exits.

Every ``OnnxqError`` becomes ``error: <message>`` on stderr and exit code 2.
"""

from __future__ import annotations

import click

from onnxq.errors import OnnxqError


class _Group(click.Group):
    """Turns library errors into one-line messages and exit code 2; Ctrl-C into exit 130."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except OnnxqError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written", err=True)
            ctx.exit(130)


@click.group(cls=_Group)
@click.version_option(package_name="onnxq")
def main() -> None:
    """Quantize ONNX models to int8 QDQ and measure what it costs and buys."""


def _register() -> None:
    """One module per command; importing them here keeps ``onnxq --help`` complete."""
    from onnxq.cli import (
        calibrate,
        check_cmd,
        compare,
        demo,
        export,
        inspect_cmd,
        quantize,
        sensitivity,
    )

    for module in (demo, quantize, calibrate, export, compare, inspect_cmd, check_cmd, sensitivity):
        main.add_command(module.command)


_register()

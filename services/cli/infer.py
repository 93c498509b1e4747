"""``maas infer`` and ``maas generate``: call a deployed model through the gateway (KServe v2 gRPC)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import typer
from maas.tensors import decode_outputs

from services.cli.common import client, console, out, run_async
from shared.errors import InvalidArgument


def _inputs(specs: list[str]) -> dict[str, np.ndarray] | np.ndarray:
    """``x.npy`` (the model's only input) or ``NAME=x.npy`` per input; the SDK casts each to the datatype the
    model declares."""
    named: dict[str, np.ndarray] = {}
    for spec in specs:
        name, sep, path = spec.rpartition("=")
        array = np.load(Path(path), allow_pickle=False)
        if not sep:
            if len(specs) != 1:
                raise InvalidArgument("with several inputs, pass --input NAME=FILE.npy each")
            return array
        named[name] = array
    return named


@run_async
async def infer(
    model: str = typer.Argument(..., help="Deployed model name."),
    input: list[str] = typer.Option(..., help="x.npy (the only input) or NAME=x.npy, repeated per input."),
    version: str = typer.Option("", help="Version number or alias (default: the deployment's)."),
    output: Path | None = typer.Option(None, help="Also save the outputs to this .npz file."),
) -> None:
    """Run one inference through the gateway and print the outputs (argmax for class scores)."""
    async with client() as sdk:
        response = await sdk.infer_response(model, _inputs(input), version=version)
    outputs = decode_outputs(response)
    out.print(f"{response.model_name}@{response.model_version}", highlight=False)
    for name, array in outputs.items():
        out.print(f"{name} {array.dtype} {list(array.shape)}", highlight=False)
        with np.printoptions(precision=4, suppress=True, threshold=64):
            out.print(array, highlight=False)
        if array.ndim == 2 and array.dtype.kind == "f":
            out.print(f"argmax: {array.argmax(axis=1).tolist()}", highlight=False)
    if output is not None:
        np.savez(output, **outputs)  # type: ignore[arg-type]


@run_async
async def generate(
    model: str = typer.Argument(..., help="Deployed generative model (zoo decoder-lm, byte-level)."),
    prompt: str = typer.Argument(..., help="Text to continue."),
    max_tokens: int = typer.Option(64, help="Tokens to generate at most."),
    version: str = typer.Option("", help="Version number or alias (default: the deployment's)."),
) -> None:
    """Stream a continuation of the prompt token by token (ModelStreamInfer)."""
    sys.stdout.write(prompt)
    async with client() as sdk:
        async for piece in sdk.generate(model, prompt, max_tokens=max_tokens, version=version):
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    console.print(f"[dim]{model}: done[/]")

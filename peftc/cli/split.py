"""``peftc split``: a data set → a continual-learning ``tasks.yaml`` (see docs/training.md, "Benchmarks")."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from peftc.cli.app import app
from peftc.cli.common import console, handle_errors, print_json


@app.command("split")
@handle_errors
def split_cmd(
    data: Annotated[Path, typer.Argument(help="An ImageFolder, a folder with train/ and val/, or (with --domains) "
                                         "a folder of such folders, one per domain.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The tasks.yaml to write.")],
    tasks: Annotated[Optional[int], typer.Option("--tasks", help="Number of tasks (class-incremental: required; "
                                                 "domains: one per domain).")] = None,
    order: Annotated[Optional[str], typer.Option("--order", help="Class order: seed:S (PyCIL's permutation; "
                                                 "default seed:1993) or a file with one class name per line.")] = None,
    init_classes: Annotated[Optional[int], typer.Option("--init-classes", help="Classes of the first task "
                                                        "(B50 + 5 steps of 10: --init-classes 50 --tasks 6).")] = None,
    domains: Annotated[bool, typer.Option("--domains", help="Domain-incremental: one task per sub-folder of DATA, "
                                          "all with the same classes.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print the written sequence as JSON.")] = False,
) -> None:
    """Split a data set into a class- or domain-incremental task sequence with a stored class order."""
    from peftc.train.split import SplitError, split_classes, split_domains, write_split

    if domains:
        if init_classes is not None:
            raise SplitError("--init-classes belongs to class-incremental splits, not --domains")
        document = split_domains(data, out, tasks, order)
    else:
        if tasks is None:
            raise SplitError("give --tasks N (the number of class-incremental tasks)")
        document = split_classes(data, tasks, out, order, init_classes)
    path = write_split(document, out)
    if json_:
        print_json({"path": str(path), **document})
        return
    meta = document["split"]
    sizes = [len(t["classes"]) for t in document["tasks"]]
    shown = str(sizes[0]) if len(set(sizes)) == 1 else f"{sizes[0]} then {sizes[1]}"
    what = f"{len(sizes)} tasks " + ("(domains) " if domains else "") + f"of {shown} classes"
    console.print(f"wrote {path}: {meta['kind']}, {what}; order "
                  + (f"seed {meta['seed']} (PyCIL's permutation)" if meta["seed"] is not None else "as given"))

"""Write docs/configuration.md from the settings model: `python -m detector.commands.config_docs`.

The page is generated so that it cannot drift from `detector/config.py`: each setting's
environment variable, type, default and description come from the model itself (descriptions
are the fields' docstrings), and tests/test_configuration_docs.py fails when the committed page
differs. `make docs` runs this module; a developer tool, not a `detector` sub-command.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic.types import PathType

from detector.config import Settings

#: The page, from the repository's root.
PAGE = Path("docs/configuration.md")
#: What regenerates the page; the test's failure message names it.
COMMAND = "make docs"

HEADER = f"""\
# Configuration

<!-- Generated from detector/config.py by `{COMMAND}`: edit the descriptions there. -->

The detector reads one settings model, from these sources, each overriding the one before:

1. the defaults below;
2. a TOML file given with `--config FILE`, one table per section (`[kafka]`, `[topics]`, …);
3. environment variables: `{{prefix}}`, then the section and the setting in capitals, joined by
   `{{delimiter}}`.

A list is written in an environment variable as JSON, e.g.
`{{prefix}}MODEL{{delimiter}}PROVIDERS='["CUDAExecutionProvider", "CPUExecutionProvider"]'`.
Unknown settings and wrong values are refused at start, naming the field, with exit status 2.
`detector check-config [--config FILE]` prints the effective configuration, secrets masked.
Secrets belong in the environment or in files mounted from a secret store, never in a TOML file
kept in git ([operations](operations.md#security)).
"""

NAMES = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    Path: "path",
    SecretStr: "secret string",
}
#: The bounds pydantic keeps as metadata beside a type (`annotated_types.Gt` ...: their
#: attribute), and their symbol in the type column.
BOUNDS = (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"))


def render() -> str:
    """The whole page, as committed."""
    config = Settings.model_config
    prefix, delimiter = config["env_prefix"], config["env_nested_delimiter"]
    parts = [HEADER.format(prefix=prefix, delimiter=delimiter)]
    for section_name, section in Settings.model_fields.items():
        model = section.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        parts.append(f"## `[{section_name}]`\n\n{_paragraph(model.__doc__)}\n")
        parts.append("| setting | environment variable | type | default | description |")
        parts.append("| --- | --- | --- | --- | --- |")
        for name, field in model.model_fields.items():
            variable = f"{prefix}{section_name}{delimiter}{name}".upper()
            cells = [
                f"`{name}`",
                f"`{variable}`",
                describe_type(field),
                _default(field),
                _paragraph(field.description),
            ]
            parts.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        parts.append("")
    return "\n".join(parts)


def describe_type(field: FieldInfo) -> str:
    """`integer ≥ 0`, `` `json` or `console` ``, `list of strings`: what a value may be."""
    return _type(field.annotation) + _bounds(field.metadata)


def _type(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        if any(isinstance(item, PathType) and item.path_type == "file" for item in args[1:]):
            return "path of an existing file"
        return _type(args[0]) + _bounds(args[1:])
    if origin in (Union, types.UnionType):
        return " or ".join(_type(arg) for arg in args if arg is not type(None))
    if origin is Literal:
        return _one_of([f"`{arg}`" for arg in args])
    if origin is list:
        return f"list of {_type(args[0])}s"
    return NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _one_of(choices: list[str]) -> str:
    """`a`, `b` or `c`."""
    return " or ".join([", ".join(choices[:-1]), choices[-1]] if len(choices) > 1 else choices)


def _bounds(metadata: Sequence[Any]) -> str:
    """` ≥ 1, ≤ 65535`: the bounds pydantic keeps beside a type, if any."""
    bounds = ", ".join(_bound_list(metadata))
    return f" {bounds}" if bounds else ""


def _bound_list(metadata: Sequence[Any]) -> list[str]:
    found = []
    for item in metadata:
        if isinstance(item, FieldInfo):  # `Annotated[int, Field(ge=1)]` nests its bounds
            found += _bound_list(item.metadata)
            continue
        for attribute, symbol in BOUNDS:
            if (bound := getattr(item, attribute, None)) is not None:
                found.append(f"{symbol} {bound}")
    return found


def _default(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, Path):
        return f"`{value}`"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    return f"`{json.dumps(value)}`"


def _paragraph(text: str | None) -> str:
    """A docstring as one line: the table cell it goes into cannot hold line breaks."""
    return " ".join((text or "").split())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m detector.commands.config_docs",
        description=f"Write {PAGE} from the settings model's field descriptions.",
    )
    parser.add_argument(
        "--output", type=Path, default=PAGE, help=f"where to write it ('-': stdout; {PAGE})"
    )
    args = parser.parse_args(argv)
    page = render()
    if str(args.output) == "-":
        sys.stdout.write(page)
    else:
        args.output.write_text(page, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
